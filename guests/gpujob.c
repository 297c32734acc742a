/*
 * gpujob: drives a vgpu (docs/devices/vgpu.md) like a small GPU job. It programs the
 * GGTT (its VRAM working set, block-swizzled, and a window of its own RAM), then each
 * round submits one command buffer — FILL, COPY, BLIT, an upload from RAM, a read-back
 * to RAM, a REDUCE, every fourth round a MATMUL, and a FENCE — waits on the fence in
 * memory, and checks every result against a CPU model of VRAM kept in its own RAM.
 * At the end it reads all of its VRAM back and compares it with the model.
 *
 * Parameters (command line):
 *   seed=N       default 1
 *   rounds=N     default 200
 *   ws=SIZE      VRAM working set, default 8M (at most the vGPU's share, <= 512M)
 *   block=SIZE   block size, power of two, 4K .. 1M, default 64K; ws >= 4 blocks
 *   dim=N        MATMUL dimension, 1 .. 64, default 16
 *   rate=N       rounds per second, 0 = as fast as possible, default 0
 *   dev=N        device slot 0 .. 7; default: the first slot holding a vgpu
 *   timeout=S    seconds without progress before giving up, default 60
 *
 * Memory: ring at 16 MiB, the RAM window (GPU-visible) from 17 MiB, the VRAM model from
 * 32 MiB. RESULT depends only on seed, rounds, ws, block and dim. Exit: 0 ok, 1 a check
 * failed, 2 bad parameters or no device.
 */
#include "rt.h"

#define MMIO_BASE       0xFEB00000UL
#define MMIO_STRIDE     0x1000UL
#define VGPU_ID         0x55504756u     /* "VGPU" */

#define REG_ID          0x000
#define REG_VERSION     0x004
#define REG_CAPS        0x008
#define REG_CTRL        0x00C
#define REG_RING_BASE   0x010
#define REG_RING_SIZE   0x018
#define REG_RING_TAIL   0x01C
#define REG_RING_HEAD   0x020
#define REG_STATUS      0x024
#define REG_IRQ_STATUS  0x028
#define REG_ERROR_CODE  0x02C
#define REG_ERROR_ADDR  0x030
#define REG_KEY         0x038
#define REG_COMPLETED   0x040
#define REG_GGTT_INDEX  0x050
#define REG_GGTT_REFUSED 0x054
#define REG_GGTT_DATA   0x058
#define REG_VRAM_SIZE   0x060
#define REG_APERTURE_BASE 0x070
#define REG_FENCES      0x07C
#define REG_FENCE_REG   0x100
#define APERTURE        0x800

#define CTRL_ENABLE     1u
#define STATUS_BUSY     1u
#define STATUS_ERROR    2u
#define CAPS_NEEDED     0x3fu

#define OP_FILL         1u
#define OP_COPY         2u
#define OP_BLIT         3u
#define OP_COMPUTE      4u
#define OP_FENCE        5u
#define COMPUTE_MATMUL  1u
#define COMPUTE_REDUCE  2u

#define GGTT_VALID      1UL
#define GGTT_SYSTEM     2UL

#define PAGE            4096UL
#define RING_GPA        (16UL << 20)
#define RING_SIZE       256u
#define SYS_GPA         (17UL << 20)
#define SYS_SIZE        (8UL << 20)
#define SYS_VA          0x30000000UL    /* where the RAM window sits in GPU address space */
#define MODEL_GPA       (32UL << 20)
#define READBACK_SLOTS  4
#define PITCH           1024UL
#define MAX_DIM         64
#define MAX_WS          (512UL << 20)

/* the RAM window: read-back slots, upload buffer, matrices, results, the fence */
#define RB_OFF          0UL                     /* 4 x block (<= 4 MiB) */
#define UP_OFF          (4UL << 20)             /* 1 block (<= 1 MiB) */
#define MAT_A_OFF       (5UL << 20)
#define MAT_B_OFF       (MAT_A_OFF + 16384)
#define MAT_C_OFF       (MAT_B_OFF + 16384)
#define RED_OFF         (MAT_C_OFF + 16384)
#define FENCE_OFF       (RED_OFF + 4096)

struct cmd {
	u32 opcode, flags;
	u64 arg[7];
};

#define cbar() __asm__ volatile("" ::: "memory")

static u64 p_seed, p_rounds, p_ws, p_block, p_dim, p_rate, p_dev, p_timeout;
static volatile u8 *regs;
static volatile struct cmd *ring;
static u8 *sysw;                /* the RAM window, CPU address */
static u8 *model;               /* CPU model of GPU addresses [0, ws) */
static u64 nblocks, key, nfences, submitted, irq_total, result_hash;
static u32 tail;

static inline u32 rd32(u32 off) { return *(volatile u32 *)(regs + off); }
static inline void wr32(u32 off, u32 v) { *(volatile u32 *)(regs + off) = v; }
static inline u64 rd64(u32 off) { return *(volatile u64 *)(regs + off); }
static inline void wr64(u32 off, u64 v) { *(volatile u64 *)(regs + off) = v; }
static inline void cpu_pause(void) { __asm__ volatile("pause" ::: "memory"); }

static __attribute__((noreturn)) void fail(const char *msg, u32 code)
{
	rt_puts("gpujob: ");
	rt_puts(code == 2 ? "ERROR " : "FAILED ");
	rt_puts(msg);
	rt_puts("\n");
	debug_exit(code);
}

static __attribute__((noreturn)) void mismatch(const char *what, u64 round, u64 expected, u64 got)
{
	rt_puts("gpujob: MISMATCH ");
	rt_puts(what);
	rt_puts(" round=");
	rt_put_dec(round);
	rt_puts(" expected=0x");
	rt_put_hex(expected, 16);
	rt_puts(" got=0x");
	rt_put_hex(got, 16);
	rt_puts("\n");
	debug_exit(1);
}

static __attribute__((noreturn)) void device_failed(const char *what)
{
	rt_puts("gpujob: FAILED ");
	rt_puts(what);
	rt_puts(" status=0x");
	rt_put_hex(rd32(REG_STATUS), 8);
	rt_puts(" error_code=");
	rt_put_dec(rd32(REG_ERROR_CODE));
	rt_puts(" error_addr=0x");
	rt_put_hex(rd64(REG_ERROR_ADDR), 16);
	rt_puts(" head=");
	rt_put_dec(rd32(REG_RING_HEAD));
	rt_puts(" tail=");
	rt_put_dec(tail);
	rt_puts("\n");
	debug_exit(1);
}

/* ---- the ring ---- */
static void emit(u32 op, u64 a0, u64 a1, u64 a2, u64 a3, u64 a4, u64 a5, u64 a6)
{
	volatile struct cmd *c = &ring[tail % RING_SIZE];
	c->opcode = op;
	c->flags = 0;
	c->arg[0] = a0;
	c->arg[1] = a1;
	c->arg[2] = a2;
	c->arg[3] = a3;
	c->arg[4] = a4;
	c->arg[5] = a5;
	c->arg[6] = a6;
	tail++;
	submitted++;
}

static void doorbell(void)
{
	cbar();
	wr32(REG_RING_TAIL, tail);
}

static volatile u64 *fence_word(void) { return (volatile u64 *)(sysw + FENCE_OFF); }

static void wait_fence(u64 value)
{
	u64 limit = p_timeout * tsc_khz() * 1000, since = rdtsc();
	while (*fence_word() != value) {
		for (int i = 0; i < 2000 && *fence_word() != value; i++)
			cpu_pause();
		if (*fence_word() == value)
			break;
		if (rd32(REG_STATUS) & STATUS_ERROR)
			device_failed("device reports an error");
		if (limit && rdtsc() - since > limit)
			device_failed("fence timeout");
		halt_us(20);
	}
	cbar();
}

/* ---- the CPU model of the commands ---- */
static u64 reduce_cpu(const u8 *p, u64 words)
{
	const u64 *w = (const u64 *)p;
	u64 sum = 0;
	for (u64 i = 0; i < words; i++)
		sum += w[i] * (2 * i + 1);
	return sum + key;
}

static u64 first_diff(const u8 *a, const volatile u8 *b, u64 len)
{
	const u64 *x = (const u64 *)a;
	const volatile u64 *y = (const volatile u64 *)b;
	for (u64 i = 0; i < len / 8; i++)
		if (x[i] != y[i])
			return i;
	return len / 8;
}

static u64 hash_bytes(u64 h, const u8 *p, u64 len)
{
	const u64 *w = (const u64 *)p;
	for (u64 i = 0; i < len / 8; i++)
		h = (h ^ w[i]) * 0x100000001b3UL;
	return mix64(h);
}

static void fill_words(u8 *p, u64 len, u64 s)
{
	u64 *w = (u64 *)p;
	s |= 1;
	for (u64 i = 0; i < len / 8; i++) {
		s ^= s << 13;
		s ^= s >> 7;
		s ^= s << 17;
		w[i] = s;
	}
}

/* ---- set-up ---- */
static void params(void)
{
	int err = 0;
	p_seed = cmd_get_u64("seed", 1, &err);
	p_rounds = cmd_get_u64("rounds", 200, &err);
	p_ws = cmd_get_u64("ws", 8UL << 20, &err);
	p_block = cmd_get_u64("block", 64UL << 10, &err);
	p_dim = cmd_get_u64("dim", 16, &err);
	p_rate = cmd_get_u64("rate", 0, &err);
	p_dev = cmd_get_u64("dev", 8, &err);
	p_timeout = cmd_get_u64("timeout", 60, &err);
	if (err)
		fail("malformed number on the command line", 2);
	if (p_block < PAGE || p_block > (1UL << 20) || (p_block & (p_block - 1)))
		fail("block must be a power of two, 4K .. 1M", 2);
	if (p_ws % (2 * p_block) || p_ws < 4 * p_block || p_ws > MAX_WS)
		fail("ws must be a multiple of 2 blocks, 4 blocks .. 512M", 2);
	if (p_dim < 1 || p_dim > MAX_DIM)
		fail("dim must be 1 .. 64", 2);
	if (p_rounds < 1)
		fail("rounds must be >= 1", 2);
	nblocks = p_ws / p_block;
	u64 end = MODEL_GPA + p_ws;
	int fits = 0;
	for (int i = 0; i < ram_nregions; i++)
		if (ram_regions[i].base <= RING_GPA && ram_regions[i].base + ram_regions[i].len >= end)
			fits = 1;
	if (!fits)
		fail("RAM too small: need 32 MiB + ws", 2);
	ring = (volatile struct cmd *)RING_GPA;
	sysw = (u8 *)SYS_GPA;
	model = (u8 *)MODEL_GPA;
	rt_puts("gpujob: seed=");
	rt_put_dec(p_seed);
	rt_puts(" rounds=");
	rt_put_dec(p_rounds);
	rt_puts(" ws=");
	rt_put_dec(p_ws >> 10);
	rt_puts("K block=");
	rt_put_dec(p_block >> 10);
	rt_puts("K dim=");
	rt_put_dec(p_dim);
	rt_puts(" rate=");
	rt_put_dec(p_rate);
	rt_puts("\n");
}

static void find_device(void)
{
	u64 first = p_dev < 8 ? p_dev : 0, last = p_dev < 8 ? p_dev : 7;
	for (u64 s = first; s <= last; s++) {
		regs = (volatile u8 *)(MMIO_BASE + s * MMIO_STRIDE);
		if (rd32(REG_ID) == VGPU_ID) {
			p_dev = s;
			return;
		}
	}
	fail("no vgpu in the device slots", 2);
}

/* GPU page i of the working set lives in VRAM block (i's block ^ 1): translation is real */
static u64 vram_entry(u64 page)
{
	u64 ppb = p_block / PAGE;
	u64 blk = (page / ppb) ^ 1;
	return ((blk * p_block + (page % ppb) * PAGE)) | GGTT_VALID;
}

static void program_ggtt(void)
{
	u64 pages = p_ws / PAGE;
	wr32(REG_GGTT_INDEX, 0);
	for (u64 i = 0; i < pages; i++)
		wr64(REG_GGTT_DATA, vram_entry(i));
	wr32(REG_GGTT_INDEX, (u32)(SYS_VA / PAGE));
	for (u64 i = 0; i < SYS_SIZE / PAGE; i++)
		wr64(REG_GGTT_DATA, (SYS_GPA + i * PAGE) | GGTT_SYSTEM | GGTT_VALID);
	/* read back one of each kind */
	wr32(REG_GGTT_INDEX, (u32)(pages - 1));
	if (rd64(REG_GGTT_DATA) != vram_entry(pages - 1))
		mismatch("GGTT read-back", 0, vram_entry(pages - 1), rd64(REG_GGTT_DATA));
	/* the mediator must refuse VRAM beyond this vGPU's share, and say so once */
	(void)rd32(REG_GGTT_REFUSED);
	wr32(REG_GGTT_INDEX, (u32)(SYS_VA / PAGE - 1));
	wr64(REG_GGTT_DATA, rd64(REG_VRAM_SIZE) | GGTT_VALID);
	u32 refused = rd32(REG_GGTT_REFUSED);
	if (refused != 1)
		mismatch("GGTT_REFUSED after a bad entry", 0, 1, refused);
	if (rd32(REG_GGTT_REFUSED) != 0)
		mismatch("GGTT_REFUSED must clear on read", 0, 0, 1);
}

static void device_setup(void)
{
	find_device();
	u32 caps = rd32(REG_CAPS);
	if ((caps & CAPS_NEEDED) != CAPS_NEEDED)
		fail("the vgpu lacks a command gpujob needs", 2);
	u64 vram = rd64(REG_VRAM_SIZE);
	if (vram < p_ws)
		fail("ws is larger than the vGPU's VRAM share", 2);
	nfences = rd32(REG_FENCES);
	wr32(REG_CTRL, 0);
	tail = rd32(REG_RING_HEAD);
	wr32(REG_RING_TAIL, tail);
	program_ggtt();
	wr64(REG_RING_BASE, RING_GPA);
	wr32(REG_RING_SIZE, RING_SIZE);
	key = mix64(p_seed ^ 0x6b65796b65796b65UL);
	wr64(REG_KEY, key);
	if (rd64(REG_KEY) != 0)
		mismatch("KEY must read as 0", 0, 0, rd64(REG_KEY));
	(void)rd32(REG_IRQ_STATUS);
	*fence_word() = 0;
	wr32(REG_CTRL, CTRL_ENABLE);
	rt_puts("gpujob: vgpu in slot ");
	rt_put_dec(p_dev);
	rt_puts(" version=");
	rt_put_dec(rd32(REG_VERSION));
	rt_puts(" vram=");
	rt_put_dec(vram >> 20);
	rt_puts("M fences=");
	rt_put_dec(nfences);
	rt_puts("\n");
}

/* ---- one round: a command buffer, then its checks ---- */
static u64 pick_block(u64 h, u64 avoid)
{
	u64 b = h % nblocks;
	return b == avoid ? (b + 1) % nblocks : b;
}

static void round_commands(u64 r, u64 *rb_block, u32 *mm)
{
	u64 h = mix64(mix64(p_seed * 0x9e3779b97f4a7c15UL + r));
	u64 B = p_block;
	/* FILL a whole block */
	u64 f = h % nblocks, v = mix64(h ^ 1);
	emit(OP_FILL, f * B, B, v, 0, 0, 0, 0);
	for (u64 i = 0; i < B / 8; i++)
		((u64 *)(model + f * B))[i] = v;
	/* COPY part of one block into another */
	u64 a = mix64(h ^ 2) % nblocks, b = pick_block(mix64(h ^ 3), a);
	u64 len = 8 * (1 + mix64(h ^ 4) % (B / 8));
	u64 oa = 8 * (mix64(h ^ 5) % ((B - len) / 8 + 1)), ob = 8 * (mix64(h ^ 6) % ((B - len) / 8 + 1));
	emit(OP_COPY, a * B + oa, b * B + ob, len, 0, 0, 0, 0);
	memcpy(model + b * B + ob, model + a * B + oa, len);
	/* BLIT a rectangle between two blocks seen as PITCH-wide surfaces */
	u64 rows = B / PITCH, c = mix64(h ^ 7) % nblocks, e = pick_block(mix64(h ^ 8), c);
	u64 w = 1 + mix64(h ^ 9) % PITCH, hh = 1 + mix64(h ^ 10) % rows;
	u64 sx = mix64(h ^ 11) % (PITCH - w + 1), sy = mix64(h ^ 12) % (rows - hh + 1);
	u64 dx = mix64(h ^ 13) % (PITCH - w + 1), dy = mix64(h ^ 14) % (rows - hh + 1);
	u64 src = c * B + sy * PITCH + sx, dst = e * B + dy * PITCH + dx;
	emit(OP_BLIT, src, dst, PITCH, PITCH, w, hh, 0);
	for (u64 y = 0; y < hh; y++)
		memcpy(model + dst + y * PITCH, model + src + y * PITCH, w);
	/* every other round, upload a block from RAM */
	if (r % 2 == 0) {
		u64 u = mix64(h ^ 15) % nblocks;
		fill_words(sysw + UP_OFF, B, mix64(h ^ 16));
		cbar();
		emit(OP_COPY, SYS_VA + UP_OFF, u * B, B, 0, 0, 0, 0);
		memcpy(model + u * B, sysw + UP_OFF, B);
	}
	/* read one block back into RAM, and reduce another */
	u64 g = mix64(h ^ 17) % nblocks, q = mix64(h ^ 18) % nblocks;
	u64 slot = r % READBACK_SLOTS;
	emit(OP_COPY, g * B, SYS_VA + RB_OFF + slot * B, B, 0, 0, 0, 0);
	emit(OP_COMPUTE, COMPUTE_REDUCE, q * B, B / 8, SYS_VA + RED_OFF, 0, 0, 0);
	((u64 *)(sysw + RED_OFF))[1] = reduce_cpu(model + q * B, B / 8);
	*rb_block = g;
	/* every fourth round, a matrix multiply in RAM */
	*mm = 0;
	if (r % 4 == 1) {
		u32 *A = (u32 *)(sysw + MAT_A_OFF), *Bm = (u32 *)(sysw + MAT_B_OFF);
		for (u64 i = 0; i < p_dim * p_dim; i++) {
			A[i] = (u32)mix64(h ^ (0x100 + i));
			Bm[i] = (u32)mix64(h ^ (0x10000 + i));
		}
		cbar();
		emit(OP_COMPUTE, COMPUTE_MATMUL, SYS_VA + MAT_A_OFF, SYS_VA + MAT_B_OFF,
		     SYS_VA + MAT_C_OFF, p_dim, p_dim, p_dim);
		*mm = 1;
	}
	emit(OP_FENCE, SYS_VA + FENCE_OFF, r + 1, r % nfences, 0, 0, 0, 0);
}

static void check_round(u64 r, u64 g, u32 mm)
{
	u64 B = p_block;
	const volatile u8 *rb = sysw + RB_OFF + (r % READBACK_SLOTS) * B;
	u64 i = first_diff(model + g * B, rb, B);
	if (i < B / 8)
		mismatch("read-back word", r, ((u64 *)(model + g * B))[i], ((volatile u64 *)rb)[i]);
	u64 red = ((volatile u64 *)(sysw + RED_OFF))[0], want = ((u64 *)(sysw + RED_OFF))[1];
	if (red != want)
		mismatch("REDUCE", r, want, red);
	result_hash = mix64(result_hash ^ red);
	result_hash = hash_bytes(result_hash, model + g * B, B);
	if (mm) {
		const u32 *A = (const u32 *)(sysw + MAT_A_OFF), *Bm = (const u32 *)(sysw + MAT_B_OFF);
		const volatile u32 *C = (const volatile u32 *)(sysw + MAT_C_OFF);
		for (u64 y = 0; y < p_dim; y++)
			for (u64 x = 0; x < p_dim; x++) {
				u32 s = (u32)key;
				for (u64 k = 0; k < p_dim; k++)
					s += A[y * p_dim + k] * Bm[k * p_dim + x];
				if (C[y * p_dim + x] != s)
					mismatch("MATMUL element", r, s, C[y * p_dim + x]);
				result_hash = mix64(result_hash ^ s);
			}
	}
	u64 fr = rd64(REG_FENCE_REG + 8 * (u32)(r % nfences));
	if (fr != r + 1)
		mismatch("fence register", r, r + 1, fr);
	irq_total += rd32(REG_IRQ_STATUS);
	/* every eighth round, look at one word through the aperture */
	if (r % 8 == 7) {
		u64 gva = 8 * (mix64(r ^ p_seed ^ 0xa9) % (p_ws / 8));
		wr64(REG_APERTURE_BASE, gva);
		u64 got = rd64(APERTURE);
		if (got != *(u64 *)(model + gva))
			mismatch("aperture read", r, *(u64 *)(model + gva), got);
	}
}

/* pacing: rounds on a TSC schedule */
static u64 rl_next;

static void pace(u64 r)
{
	if (!p_rate)
		return;
	u64 khz = tsc_khz();
	if (r == 0)
		rl_next = rdtsc();
	rl_next += khz * 1000 / p_rate;
	u64 now = rdtsc();
	if (now > rl_next + khz * 50)
		rl_next = now - khz * 50;       /* at most 50 ms of catch-up */
	while ((now = rdtsc()) < rl_next) {
		u64 us = (rl_next - now) * 1000 / khz;
		halt_us(us > 10000 ? 10000 : (us ? (u32)us : 1));
	}
}

/* write a few words through the aperture before the job: CPU writes to VRAM */
static void aperture_seed(void)
{
	for (u64 k = 0; k < 16; k++) {
		u64 gva = 8 * (mix64(p_seed ^ (0xab00 + k)) % (p_ws / 8)), v = mix64(p_seed + k);
		wr64(REG_APERTURE_BASE, gva & ~(u64)0x7ff);
		wr64(APERTURE + (u32)(gva & 0x7ff), v);
		*(u64 *)(model + gva) = v;
	}
}

/* the whole working set back through RAM, compared with the model */
static u64 final_readback(u64 fence)
{
	u64 B = p_block, h = 0x7672616d76726d21UL;
	for (u64 blk = 0; blk < nblocks; blk += READBACK_SLOTS) {
		u64 n = nblocks - blk < READBACK_SLOTS ? nblocks - blk : READBACK_SLOTS;
		for (u64 s = 0; s < n; s++)
			emit(OP_COPY, (blk + s) * B, SYS_VA + RB_OFF + s * B, B, 0, 0, 0, 0);
		emit(OP_FENCE, SYS_VA + FENCE_OFF, ++fence, 0, 0, 0, 0, 0);
		doorbell();
		wait_fence(fence);
		for (u64 s = 0; s < n; s++) {
			const volatile u8 *rb = sysw + RB_OFF + s * B;
			u64 i = first_diff(model + (blk + s) * B, rb, B);
			if (i < B / 8)
				mismatch("final VRAM word", blk + s, ((u64 *)(model + (blk + s) * B))[i],
					 ((volatile u64 *)rb)[i]);
			h = hash_bytes(h, model + (blk + s) * B, B);
		}
	}
	return h;
}

void guest_main(int vcpu, int nvcpus)
{
	(void)nvcpus;
	if (vcpu != 0)
		park_forever();
	params();
	device_setup();
	u64 completed0 = rd64(REG_COMPLETED);
	/* VRAM starts in an unknown state: fill the working set, and the model with it */
	for (u64 b = 0; b < nblocks; b++) {
		emit(OP_FILL, b * p_block, p_block, mix64(p_seed ^ b), 0, 0, 0, 0);
		for (u64 i = 0; i < p_block / 8; i++)
			((u64 *)(model + b * p_block))[i] = mix64(p_seed ^ b);
		if (tail % RING_SIZE == RING_SIZE - 1) {
			emit(OP_FENCE, SYS_VA + FENCE_OFF, 1UL << 62 | b, 0, 0, 0, 0, 0);
			doorbell();
			wait_fence(1UL << 62 | b);
		}
	}
	emit(OP_FENCE, SYS_VA + FENCE_OFF, 1UL << 63, 0, 0, 0, 0, 0);
	doorbell();
	wait_fence(1UL << 63);
	aperture_seed();
	result_hash = mix64(p_seed ^ 0x6770756a6f62UL);
	for (u64 r = 0; r < p_rounds; r++) {
		u64 g;
		u32 mm;
		pace(r);
		round_commands(r, &g, &mm);
		doorbell();
		wait_fence(r + 1);
		check_round(r, g, mm);
	}
	u64 vram_hash = final_readback(p_rounds);
	irq_total += rd32(REG_IRQ_STATUS);
	u64 done = rd64(REG_COMPLETED) - completed0;
	if (done != submitted)
		mismatch("COMPLETED count", p_rounds, submitted, done);
	if (irq_total != submitted)
		mismatch("IRQ_STATUS total", p_rounds, submitted, irq_total);
	if (rd32(REG_STATUS) & (STATUS_BUSY | STATUS_ERROR))
		mismatch("STATUS when idle", p_rounds, 0, rd32(REG_STATUS));
	wr32(REG_CTRL, 0);
	rt_puts("gpujob: commands=");
	rt_put_dec(submitted);
	rt_puts(" rounds=");
	rt_put_dec(p_rounds);
	rt_puts("\n");
	u64 res = mix64(0x6770756a6f62UL ^ result_hash);
	res = mix64(res ^ vram_hash);
	res = mix64(res ^ submitted);
	rt_puts("RESULT ");
	rt_put_hex(res, 16);
	rt_puts("\n");
	debug_exit(0);
}

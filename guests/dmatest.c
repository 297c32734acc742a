/*
 * dmatest: drives a dmaengine device (docs/devices/dmaengine.md) with a deterministic
 * stream of FILL, COPY and CHECKSUM descriptors, checks every completion with the CPU,
 * and proves with one RESULT line that no DMA was lost or repeated.
 *
 * Parameters (command line):
 *   seed=N          default 1
 *   rounds=N        default 100; each round submits `bufs` descriptors
 *   bufs=N          number of buffers, 2 .. 4096, default 64
 *   bufsize=SIZE    bytes per buffer, multiple of 8, 8 .. 16M, default 64K
 *   depth=N         descriptors in flight at most, 1 .. 2048, default 16
 *   rate=N          descriptors per second, 0 = as fast as possible, default 0
 *   dev=N           device slot 0 .. 7, default 0
 *   timeout=S       seconds without progress before giving up, 0 = never, default 60
 *
 * Memory (from 16 MiB): the ring, one completion record per ring slot, then the buffers.
 * Only vCPU 0 works. RESULT depends only on seed, rounds, bufs and bufsize: not on depth,
 * rate, dev or timing. Exit: 0 ok, 1 a check failed, 2 bad parameters or no device.
 */
#include "rt.h"

#define AREA_START      (16UL << 20)
#define BUFS_OFFSET     (1UL << 20)     /* ring (<= 256 KiB) + records (<= 64 KiB) fit below */
#define PAGE_SIZE       4096UL

#define MMIO_BASE       0xFEB00000UL
#define MMIO_STRIDE     0x1000UL
#define DMAE_ID         0x45414D44u     /* "DMAE" */

#define REG_ID          0x00
#define REG_VERSION     0x04
#define REG_CAPS        0x08
#define REG_CTRL        0x0C
#define REG_RING_BASE   0x10
#define REG_RING_SIZE   0x18
#define REG_RING_TAIL   0x1C
#define REG_RING_HEAD   0x20
#define REG_STATUS      0x24
#define REG_IRQ_STATUS  0x28
#define REG_ERROR_CODE  0x2C
#define REG_KEY         0x30
#define REG_COMPLETED   0x38

#define CTRL_ENABLE     1u
#define STATUS_BUSY     1u
#define STATUS_ERROR    2u
#define CAPS_NEEDED     7u              /* copy, fill, checksum */

#define OP_COPY         1u
#define OP_FILL         2u
#define OP_CHECKSUM     3u

#define MAX_BUFS        4096
#define MAX_DEPTH       2048
#define MAX_RING        4096
#define MAX_BUFSIZE     (16UL << 20)
#define IRQ_READ_EVERY  64              /* completions between IRQ_STATUS reads */

struct desc {
	u32 opcode, flags;
	u64 src, dst, len, value, completion, seq, reserved;
};

struct crec {
	u64 seq, result;
};

/* what the guest submitted into one ring slot, to check its completion against */
struct job {
	u64 n;          /* global descriptor number (0-based) */
	u64 seq;
	u32 op, round;
	u32 a, b;       /* COPY: a = src, b = dst; FILL: b; CHECKSUM: a */
	u64 aoff, boff, len, value;
};

#define cbar() __asm__ volatile("" ::: "memory")

static u64 p_seed, p_rounds, p_bufs, p_bufsize, p_depth, p_rate, p_dev, p_timeout;

static volatile u8 *regs;
static volatile struct desc *ring;
static volatile struct crec *crecs;
static u8 *bufs_base;
static u64 buf_stride, ring_size, key;
static u32 idx0;                /* device ring index of our descriptor 0 */

static u64 submitted, done, rung, total;
static u64 irq_total, result_hash;
static u64 n_ops[4];
static u64 last_touch[MAX_BUFS];        /* 1 + number of the last job using a buffer */
static u64 last_write[MAX_BUFS];        /* 1 + number of the last job writing it */
static struct job jobs[MAX_RING];

/* ---- registers: 32-bit accesses; 64-bit ones as two, low half first ---- */
static inline u32 rd32(u32 off) { return *(volatile u32 *)(regs + off); }
static inline void wr32(u32 off, u32 v) { *(volatile u32 *)(regs + off) = v; }
static inline u64 rd64(u32 off)
{
	u64 lo = rd32(off);
	u64 hi = rd32(off + 4);
	return lo | (hi << 32);
}
static inline void wr64(u32 off, u64 v)
{
	wr32(off, (u32)v);
	wr32(off + 4, (u32)(v >> 32));
}

static inline void cpu_pause(void) { __asm__ volatile("pause" ::: "memory"); }

static inline u8 *buf_addr(u32 i) { return bufs_base + (u64)i * buf_stride; }

static const char *op_name(u32 op)
{
	return op == OP_COPY ? "COPY" : op == OP_FILL ? "FILL" : op == OP_CHECKSUM ? "CHECKSUM" : "?";
}

/* ---- failures ---- */
static __attribute__((noreturn)) void fail_setup(const char *msg)
{
	rt_puts("dmatest: ERROR ");
	rt_puts(msg);
	rt_puts("\n");
	debug_exit(2);
}

static void put_kv(const char *k, u64 v)
{
	rt_puts(" ");
	rt_puts(k);
	rt_puts("=0x");
	rt_put_hex(v, 16);
}

static void put_job(const struct job *j)
{
	rt_puts(" round=");
	rt_put_dec(j->round);
	rt_puts(" desc=");
	rt_put_dec(j->n);
	rt_puts(" op=");
	rt_puts(op_name(j->op));
	if (j->op != OP_FILL) {
		rt_puts(" src=");
		rt_put_dec(j->a);
		rt_puts("+");
		rt_put_dec(j->aoff);
	}
	if (j->op != OP_CHECKSUM) {
		rt_puts(" dst=");
		rt_put_dec(j->b);
		rt_puts("+");
		rt_put_dec(j->boff);
	}
	rt_puts(" len=");
	rt_put_dec(j->len);
}

static __attribute__((noreturn)) void mismatch(const struct job *j, const char *what, u64 expected,
					       u64 got)
{
	rt_puts("dmatest: MISMATCH ");
	rt_puts(what);
	if (j)
		put_job(j);
	put_kv("expected", expected);
	put_kv("got", got);
	rt_puts("\n");
	debug_exit(1);
}

static __attribute__((noreturn)) void device_failed(const char *what)
{
	u32 head = rd32(REG_RING_HEAD);
	rt_puts("dmatest: FAILED ");
	rt_puts(what);
	rt_puts(" status=0x");
	rt_put_hex(rd32(REG_STATUS), 8);
	rt_puts(" error_code=");
	rt_put_dec(rd32(REG_ERROR_CODE));
	rt_puts(" head=");
	rt_put_dec(head);
	rt_puts(" tail=");
	rt_put_dec(rd32(REG_RING_TAIL));
	rt_puts(" done=");
	rt_put_dec(done);
	rt_puts(" submitted=");
	rt_put_dec(submitted);
	if (submitted > done)
		put_job(&jobs[(idx0 + done) & (ring_size - 1)]);
	rt_puts("\n");
	debug_exit(1);
}

/* ---- the CPU's side of each check ---- */
static u64 cpu_checksum(const u8 *p, u64 len, u64 seed)
{
	const volatile u64 *w = (const volatile u64 *)p;
	u64 n = len / 8, sum = 0;
	for (u64 i = 0; i < n; i++)
		sum += w[i] * (2 * i + 1);
	return (sum + seed) ^ key;
}

/* index of the first word that differs from `value` (or from `ref`), n if none */
static u64 first_not_filled(const u8 *p, u64 len, u64 value)
{
	const volatile u64 *w = (const volatile u64 *)p;
	u64 n = len / 8;
	for (u64 i = 0; i < n; i++)
		if (w[i] != value)
			return i;
	return n;
}

static u64 first_not_copied(const u8 *dst, const u8 *src, u64 len)
{
	const volatile u64 *d = (const volatile u64 *)dst;
	const volatile u64 *s = (const volatile u64 *)src;
	u64 n = len / 8;
	for (u64 i = 0; i < n; i++)
		if (d[i] != s[i])
			return i;
	return n;
}

static void check_completion(const struct job *j, u32 slot)
{
	u64 seq = crecs[slot].seq;
	u64 result = crecs[slot].result;
	if (seq != j->seq)
		mismatch(j, "completion seq", j->seq, seq);
	if (j->op == OP_CHECKSUM) {
		u64 want = cpu_checksum(buf_addr(j->a) + j->aoff, j->len, j->value);
		if (result != want)
			mismatch(j, "checksum", want, result);
	} else {
		if (result != j->len)
			mismatch(j, "completion result", j->len, result);
		const u8 *d = buf_addr(j->b) + j->boff;
		if (j->op == OP_FILL) {
			u64 i = first_not_filled(d, j->len, j->value);
			if (i * 8 < j->len)
				mismatch(j, "fill word", j->value, ((const volatile u64 *)d)[i]);
		} else {
			const u8 *s = buf_addr(j->a) + j->aoff;
			u64 i = first_not_copied(d, s, j->len);
			if (i * 8 < j->len)
				mismatch(j, "copy word", ((const volatile u64 *)s)[i],
					 ((const volatile u64 *)d)[i]);
		}
	}
	result_hash = mix64(result_hash ^ (result + ((u64)j->op << 56)));
}

/* ---- ring ---- */
static void ring_doorbell(void)
{
	if (rung == submitted)
		return;
	cbar();
	wr32(REG_RING_TAIL, idx0 + (u32)submitted);
	rung = submitted;
}

/* Checks and retires every descriptor the device reports complete; returns how many. */
static u64 reap(void)
{
	u32 head = rd32(REG_RING_HEAD);
	cbar();
	u64 avail = (u32)(head - (idx0 + (u32)done));
	if (avail > submitted - done)
		device_failed("RING_HEAD outside the descriptors in flight");
	for (u64 k = 0; k < avail; k++) {
		u32 slot = (u32)((idx0 + done) & (ring_size - 1));
		check_completion(&jobs[slot], slot);
		done++;
		if (done % IRQ_READ_EVERY == 0)
			irq_total += rd32(REG_IRQ_STATUS);
	}
	return avail;
}

/* Waits until `target` descriptors are complete and checked. */
static void wait_done(u64 target)
{
	if (target > submitted)
		target = submitted;
	if (done >= target)
		return;
	ring_doorbell();
	u64 khz = tsc_khz();
	u64 limit = p_timeout * khz * 1000;
	u64 since = rdtsc();
	while (done < target) {
		if (reap()) {
			since = rdtsc();
			continue;
		}
		u32 slot = (u32)((idx0 + done) & (ring_size - 1));
		/* cheap wait on the oldest completion record, in memory: no VM exit */
		for (int i = 0; i < 4000 && crecs[slot].seq == ~jobs[slot].seq; i++)
			cpu_pause();
		if (rd32(REG_STATUS) & STATUS_ERROR)
			device_failed("device reports an error");
		if (limit && rdtsc() - since > limit)
			device_failed("no progress (timeout)");
	}
}

/* ---- pacing: a descriptor schedule in TSC ticks ---- */
static u64 rl_deadline, rl_step, rl_rem, rl_frac, rl_maxdebt;

static void rl_init(void)
{
	if (!p_rate)
		return;
	u64 num = tsc_khz() * 1000;
	rl_step = num / p_rate;
	rl_rem = num % p_rate;
	rl_maxdebt = tsc_khz() * 50;            /* at most 50 ms of catch-up */
	rl_deadline = rdtsc();
}

static void rl_wait(void)
{
	if (!p_rate)
		return;
	rl_deadline += rl_step;
	rl_frac += rl_rem;
	if (rl_frac >= p_rate) {
		rl_frac -= p_rate;
		rl_deadline++;
	}
	u64 now = rdtsc();
	if (now > rl_deadline + rl_maxdebt)
		rl_deadline = now - rl_maxdebt;
	if (now >= rl_deadline)
		return;
	ring_doorbell();
	while (now < rl_deadline) {
		reap();
		u64 us = (rl_deadline - now) * 1000 / tsc_khz();
		if (us > 10000)
			us = 10000;
		if (us)
			halt_us((u32)us);
		now = rdtsc();
	}
}

/* ---- the descriptor stream: a function of (seed, round, k) only ---- */
static void pick_range(u64 h, int whole, u64 *len, u64 *off1, u64 *off2)
{
	u64 words = p_bufsize / 8;
	if (whole) {
		*len = p_bufsize;
		*off1 = *off2 = 0;
		return;
	}
	u64 wl = 1 + mix64(h ^ 0x1e) % words;
	u64 span = words - wl + 1;
	*len = wl * 8;
	*off1 = (mix64(h ^ 0x2f) % span) * 8;
	*off2 = (mix64(h ^ 0x3a) % span) * 8;
}

static void make_job(struct job *j, u64 n, u32 round, u64 k)
{
	u64 h = mix64(mix64(p_seed * 0x9e3779b97f4a7c15UL + round) ^ (k * 0xd1b54a32d192ed03UL));
	u32 sel = (u32)(h % 10);
	j->n = n;
	j->round = round;
	j->seq = mix64(p_seed ^ 0x7365710000000000UL) + n + 1;
	j->op = sel < 3 ? OP_FILL : sel < 6 ? OP_COPY : OP_CHECKSUM;
	j->a = (u32)(mix64(h ^ 0x4b) % p_bufs);
	j->b = (u32)((j->a + 1 + mix64(h ^ 0x5c) % (p_bufs - 1)) % p_bufs);
	j->value = mix64(h ^ 0x6d);
	pick_range(h, (h >> 20) & 1, &j->len, &j->aoff, &j->boff);
	if (j->op == OP_FILL) {
		j->b = j->a;
		j->boff = j->aoff;
	}
}

static void submit(const struct job *j)
{
	/* A job waits for earlier ones it conflicts with, so that each completion can be
	 * checked against memory that nothing else in flight is changing. */
	if (j->op != OP_FILL)
		wait_done(last_write[j->a]);
	if (j->op != OP_CHECKSUM)
		wait_done(last_touch[j->b]);
	if (submitted - done >= p_depth)
		wait_done(submitted - p_depth + 1);
	rl_wait();

	u32 slot = (u32)((idx0 + submitted) & (ring_size - 1));
	jobs[slot] = *j;
	crecs[slot].seq = ~j->seq;
	crecs[slot].result = 0;
	volatile struct desc *d = &ring[slot];
	d->opcode = j->op;
	d->flags = 0;
	d->src = j->op == OP_FILL ? 0 : (u64)(buf_addr(j->a) + j->aoff);
	d->dst = j->op == OP_CHECKSUM ? 0 : (u64)(buf_addr(j->b) + j->boff);
	d->len = j->len;
	d->value = j->value;
	d->completion = (u64)&crecs[slot];
	d->seq = j->seq;
	d->reserved = 0;

	if (j->op != OP_FILL)
		last_touch[j->a] = j->n + 1;
	if (j->op != OP_CHECKSUM)
		last_touch[j->b] = last_write[j->b] = j->n + 1;
	n_ops[j->op]++;
	submitted++;
	if (p_rate)
		ring_doorbell();
}

/* ---- set-up ---- */
static void params(void)
{
	int err = 0;
	p_seed = cmd_get_u64("seed", 1, &err);
	p_rounds = cmd_get_u64("rounds", 100, &err);
	p_bufs = cmd_get_u64("bufs", 64, &err);
	p_bufsize = cmd_get_u64("bufsize", 64UL << 10, &err);
	p_depth = cmd_get_u64("depth", 16, &err);
	p_rate = cmd_get_u64("rate", 0, &err);
	p_dev = cmd_get_u64("dev", 0, &err);
	p_timeout = cmd_get_u64("timeout", 60, &err);
	if (err)
		fail_setup("malformed number on the command line");
	if (p_rounds < 1)
		fail_setup("rounds must be >= 1");
	if (p_bufs < 2 || p_bufs > MAX_BUFS)
		fail_setup("bufs must be 2 .. 4096");
	if (p_bufsize < 8 || p_bufsize > MAX_BUFSIZE || p_bufsize % 8)
		fail_setup("bufsize must be a multiple of 8, 8 .. 16M");
	if (p_depth < 1 || p_depth > MAX_DEPTH)
		fail_setup("depth must be 1 .. 2048");
	if (p_dev > 7)
		fail_setup("dev must be 0 .. 7");
	if (p_timeout > 1000000)
		fail_setup("timeout must be at most 1000000 s");

	rt_puts("dmatest: dev=");
	rt_put_dec(p_dev);
	rt_puts(" seed=");
	rt_put_dec(p_seed);
	rt_puts(" rounds=");
	rt_put_dec(p_rounds);
	rt_puts(" bufs=");
	rt_put_dec(p_bufs);
	rt_puts(" bufsize=");
	rt_put_dec(p_bufsize);
	rt_puts(" depth=");
	rt_put_dec(p_depth);
	rt_puts(" rate=");
	rt_put_dec(p_rate);
	rt_puts("\n");
}

static void layout(void)
{
	ring_size = 2;
	while (ring_size < 2 * p_depth)
		ring_size <<= 1;
	buf_stride = (p_bufsize + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
	u64 end = AREA_START + BUFS_OFFSET + p_bufs * buf_stride;
	int fits = 0;
	for (int i = 0; i < ram_nregions; i++)
		if (ram_regions[i].base <= AREA_START &&
		    ram_regions[i].base + ram_regions[i].len >= end)
			fits = 1;
	if (!fits) {
		rt_puts("dmatest: ERROR buffers do not fit: need RAM from 16 MiB to ");
		rt_put_dec(end >> 20);
		rt_puts(" MiB\n");
		debug_exit(2);
	}
	ring = (volatile struct desc *)AREA_START;
	crecs = (volatile struct crec *)(AREA_START + ring_size * sizeof(struct desc));
	bufs_base = (u8 *)(AREA_START + BUFS_OFFSET);
}

static void fill_buffers(void)
{
	for (u32 i = 0; i < p_bufs; i++) {
		u64 *w = (u64 *)buf_addr(i);
		u64 s = mix64(p_seed * 0xa0761d6478bd642fUL + i) | 1;
		for (u64 k = 0; k < p_bufsize / 8; k++) {
			s ^= s << 13;
			s ^= s >> 7;
			s ^= s << 17;
			w[k] = s;
		}
	}
}

static void device_setup(void)
{
	regs = (volatile u8 *)(MMIO_BASE + p_dev * MMIO_STRIDE);
	u32 id = rd32(REG_ID);
	if (id == 0xFFFFFFFFu) {
		rt_puts("dmatest: ERROR no dmaengine in slot ");
		rt_put_dec(p_dev);
		rt_puts("\n");
		debug_exit(2);
	}
	if (id != DMAE_ID) {
		rt_puts("dmatest: ERROR slot ");
		rt_put_dec(p_dev);
		rt_puts(" holds id 0x");
		rt_put_hex(id, 8);
		rt_puts(", not a dmaengine\n");
		debug_exit(2);
	}
	u32 version = rd32(REG_VERSION), caps = rd32(REG_CAPS);
	if ((caps & CAPS_NEEDED) != CAPS_NEEDED) {
		rt_puts("dmatest: ERROR dmaengine caps 0x");
		rt_put_hex(caps, 8);
		rt_puts(" lack copy, fill or checksum\n");
		debug_exit(2);
	}

	wr32(REG_CTRL, 0);
	u32 head = rd32(REG_RING_HEAD), tail = rd32(REG_RING_TAIL);
	if (head != tail)
		device_failed("ring not idle at start");
	idx0 = head;
	for (u64 s = 0; s < ring_size; s++)
		crecs[s].seq = crecs[s].result = 0;
	cbar();
	wr64(REG_RING_BASE, (u64)ring);
	wr32(REG_RING_SIZE, (u32)ring_size);
	if (rd64(REG_RING_BASE) != (u64)ring)
		mismatch(NULL, "RING_BASE read-back", (u64)ring, rd64(REG_RING_BASE));
	if (rd32(REG_RING_SIZE) != ring_size)
		mismatch(NULL, "RING_SIZE read-back", ring_size, rd32(REG_RING_SIZE));
	key = mix64(p_seed ^ 0x4b45594b45594b45UL);
	wr64(REG_KEY, key);
	if (rd64(REG_KEY) != 0)
		mismatch(NULL, "KEY must read as 0", 0, rd64(REG_KEY));
	(void)rd32(REG_IRQ_STATUS);             /* start counting from zero */
	wr32(REG_CTRL, CTRL_ENABLE);
	if (!(rd32(REG_CTRL) & CTRL_ENABLE))
		mismatch(NULL, "CTRL.ENABLE read-back", CTRL_ENABLE, rd32(REG_CTRL));

	rt_puts("dmatest: dmaengine version=");
	rt_put_dec(version);
	rt_puts(" caps=0x");
	rt_put_hex(caps, 1);
	rt_puts(" ring=");
	rt_put_dec(ring_size);
	rt_puts(" at 0x");
	rt_put_hex((u64)ring, 8);
	rt_puts("\n");
}

/* After the last completion: counters must agree with what was done. */
static void finish_device(u64 completed0)
{
	u64 khz = tsc_khz();
	u64 t0 = rdtsc();
	u32 status;
	/* IRQ_STATUS and BUSY may trail RING_HEAD by a moment */
	for (;;) {
		irq_total += rd32(REG_IRQ_STATUS);
		status = rd32(REG_STATUS);
		if (irq_total > total)
			break;
		if (irq_total == total && !(status & STATUS_BUSY))
			break;
		if (rdtsc() - t0 > khz * 1000)
			break;
		halt_us(100);
	}
	if (irq_total != total)
		mismatch(NULL, "IRQ_STATUS total", total, irq_total);
	if (status & (STATUS_BUSY | STATUS_ERROR))
		mismatch(NULL, "STATUS when idle", 0, status);
	u64 completed = rd64(REG_COMPLETED) - completed0;
	if (completed != total)
		mismatch(NULL, "COMPLETED count", total, completed);
	u32 head = rd32(REG_RING_HEAD);
	if (head != idx0 + (u32)total)
		mismatch(NULL, "RING_HEAD at the end", idx0 + (u32)total, head);
	wr32(REG_CTRL, 0);
}

static u64 readback_hash(void)
{
	u64 h = 0x6275666665727321UL;
	for (u32 i = 0; i < p_bufs; i++) {
		const volatile u64 *w = (const volatile u64 *)buf_addr(i);
		u64 a = mix64(h + i), b = 0;
		for (u64 k = 0; k < p_bufsize / 8; k++) {
			a = (a ^ w[k]) * 0x100000001b3UL;
			b += a ^ (a >> 29);
		}
		h = mix64(h ^ mix64(a ^ b));
	}
	return h;
}

void guest_main(int vcpu, int nvcpus)
{
	(void)nvcpus;
	if (vcpu != 0)
		park_forever();
	params();
	layout();
	device_setup();
	fill_buffers();
	u64 completed0 = rd64(REG_COMPLETED);
	total = p_rounds * p_bufs;
	result_hash = mix64(p_seed ^ 0x726573756c7473UL);
	rl_init();

	u64 n = 0;
	struct job j;
	for (u32 r = 0; r < p_rounds; r++)
		for (u64 k = 0; k < p_bufs; k++) {
			make_job(&j, n++, r, k);
			submit(&j);
		}
	wait_done(total);
	finish_device(completed0);

	u64 mem = readback_hash();
	rt_puts("dmatest: descriptors=");
	rt_put_dec(total);
	rt_puts(" fill=");
	rt_put_dec(n_ops[OP_FILL]);
	rt_puts(" copy=");
	rt_put_dec(n_ops[OP_COPY]);
	rt_puts(" checksum=");
	rt_put_dec(n_ops[OP_CHECKSUM]);
	rt_puts(" irq=");
	rt_put_dec(irq_total);
	rt_puts("\n");

	u64 res = 0x646d6174657374UL;   /* "dmatest" */
	res = mix64(res ^ result_hash);
	res = mix64(res ^ mem);
	res = mix64(res ^ irq_total);
	rt_puts("RESULT ");
	rt_put_hex(res, 16);
	rt_puts("\n");
	debug_exit(0);
}

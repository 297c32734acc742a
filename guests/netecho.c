/*
 * netecho: answers every frame that reaches an X710-style VF (docs/devices/nic.md) with a
 * transformed copy, as a DPDK-style polled driver would: RX buffers posted in descriptor
 * rings, descriptor status polled in memory, TX tail rung once per batch.
 *
 * Frames (src/vmferry/traffic/frames.py): EtherType 0x88B5, then u32 magic, u32 flow,
 * u64 seq, u64 sent_ns, body. A PING ("VFTP") is answered with an ECHO ("VFTE"): MACs
 * swapped, header kept, every body byte XOR 0x5A. A STOP ("VFTS") is answered with a
 * RESULT frame ("VFTR": received, echoed, bad, RESULT) and ends the run.
 *
 * Parameters: dev=N (slot, default: the first VF found), ring=N descriptors per ring
 * (power of two, 8 .. 4096, default 256), bufsize=N (RX buffer bytes, multiple of 128,
 * 256 .. 16384, default 2048), frames=N (end after N PINGs, 0 = at STOP; default 0),
 * idle=S (give up after S seconds without a frame, 0 = never; default 60).
 *
 * RESULT: an order-independent hash of the PING sequence numbers answered, so the peer can
 * compute it from the echoes it got. Exit: 0 ok, 1 timeout or device error, 2 bad
 * parameters or no device.
 */
#include "rt.h"

#define AREA_START      (16UL << 20)
#define MMIO_BASE       0xFEB00000UL
#define MMIO_STRIDE     0x1000UL
#define VF_ID           0x46563758u     /* "X7VF" */

#define REG_ID          0x00
#define REG_VERSION     0x04
#define REG_NUM_QUEUES  0x08
#define REG_CTRL        0x0C
#define REG_MAC_LO      0x10
#define REG_MAC_HI      0x14
#define REG_PORT_VLAN   0x18
#define REG_RX_BUF_SIZE 0x1C
#define REG_ICR         0x20
#define REG_STATUS      0x24
#define REG_ERROR_CODE  0x28
#define REG_RX_PACKETS  0x40
#define REG_TX_PACKETS  0x50
#define Q(q, r)         (0x100 + (q) * 0x40 + (r))
#define Q_RX_BASE       0x00
#define Q_RX_LEN        0x08
#define Q_RX_HEAD       0x0C
#define Q_RX_TAIL       0x10
#define Q_RX_ENABLE     0x14
#define Q_TX_BASE       0x20
#define Q_TX_LEN        0x28
#define Q_TX_TAIL       0x30
#define Q_TX_ENABLE     0x34

#define CTRL_ENABLE     1u
#define STATUS_ERROR    2u
#define RXD_DD          (1UL << 16)
#define TXD_EOP         (1UL << 16)
#define TXD_RS          (1UL << 17)
#define TXD_DD          (1UL << 63)
#define MAX_QUEUES      4
#define BATCH           32

#define ETHERTYPE       0x88B5
#define MAGIC_PING      0x50544656u
#define MAGIC_ECHO      0x45544656u
#define MAGIC_STOP      0x53544656u
#define MAGIC_RESULT    0x52544656u
#define HDR_LEN         (14 + 24)

struct desc {
	u64 addr, word;
};

struct queue {
	volatile struct desc *rx, *tx;
	u8 *rxbuf, *txbuf;
	u32 rx_next, tx_next, tx_clean, rx_rung, tx_rung;
};

static u64 p_dev, p_ring, p_bufsize, p_frames, p_idle;
static volatile u8 *regs;
static u32 nq;
static u8 mac[6];
static struct queue qs[MAX_QUEUES];
static u64 n_rx, n_tx, n_bad, h_count, h_total, h_xor;
static int stopping;

#define cbar() __asm__ volatile("" ::: "memory")
static inline u32 rd32(u32 off) { return *(volatile u32 *)(regs + off); }
static inline void wr32(u32 off, u32 v) { *(volatile u32 *)(regs + off) = v; }
static inline u64 rd64(u32 off) { u64 lo = rd32(off); return lo | ((u64)rd32(off + 4) << 32); }
static inline void wr64(u32 off, u64 v) { wr32(off, (u32)v); wr32(off + 4, (u32)(v >> 32)); }

static u64 result_value(void)
{
	return mix64(mix64(h_total ^ h_count) ^ h_xor ^ 0x6e65746563686fUL);
}

static __attribute__((noreturn)) void fail(const char *msg, u32 code)
{
	rt_puts("netecho: ERROR ");
	rt_puts(msg);
	if (regs) {
		rt_puts(" status=0x");
		rt_put_hex(rd32(REG_STATUS), 8);
		rt_puts(" error_code=");
		rt_put_dec(rd32(REG_ERROR_CODE));
	}
	rt_puts("\n");
	debug_exit(code);
}

static void params(void)
{
	int err = 0;
	p_dev = cmd_get_u64("dev", 8, &err);
	p_ring = cmd_get_u64("ring", 256, &err);
	p_bufsize = cmd_get_u64("bufsize", 2048, &err);
	p_frames = cmd_get_u64("frames", 0, &err);
	p_idle = cmd_get_u64("idle", 60, &err);
	if (err)
		fail("malformed number on the command line", 2);
	if (p_ring < 8 || p_ring > 4096 || (p_ring & (p_ring - 1)))
		fail("ring must be a power of two, 8 .. 4096", 2);
	if (p_bufsize < 256 || p_bufsize > 16384 || p_bufsize % 128)
		fail("bufsize must be a multiple of 128, 256 .. 16384", 2);
	if (p_idle > 1000000)
		fail("idle must be at most 1000000 s", 2);
}

static void find_device(void)
{
	for (u64 slot = 0; slot < 8; slot++) {
		if (p_dev < 8 && slot != p_dev)
			continue;
		volatile u8 *r = (volatile u8 *)(MMIO_BASE + slot * MMIO_STRIDE);
		if (*(volatile u32 *)r == VF_ID) {
			regs = r;
			p_dev = slot;
			return;
		}
	}
	fail("no VF found in the device slots", 2);
}

static void setup(void)
{
	nq = rd32(REG_NUM_QUEUES);
	if (nq < 1 || nq > MAX_QUEUES)
		fail("VF reports an unsupported number of queues", 2);
	u32 lo = rd32(REG_MAC_LO), hi = rd32(REG_MAC_HI);
	for (int i = 0; i < 4; i++)
		mac[i] = (u8)(lo >> (8 * i));
	mac[4] = (u8)hi;
	mac[5] = (u8)(hi >> 8);
	wr32(REG_CTRL, 0);
	wr32(REG_RX_BUF_SIZE, (u32)p_bufsize);
	if (rd32(REG_RX_BUF_SIZE) != 0)
		fail("RX_BUF_SIZE must read as 0 (write-only)", 1);
	(void)rd32(REG_ICR);    /* clear on read: start from nothing */
	u64 ring_bytes = p_ring * sizeof(struct desc);
	u64 at = AREA_START;
	for (u32 q = 0; q < nq; q++) {
		struct queue *Qp = &qs[q];
		Qp->rx = (volatile struct desc *)at;
		at += ring_bytes;
		Qp->tx = (volatile struct desc *)at;
		at += ring_bytes;
		Qp->rxbuf = (u8 *)at;
		at += p_ring * p_bufsize;
		Qp->txbuf = (u8 *)at;
		at += p_ring * p_bufsize;
		for (u64 s = 0; s < p_ring; s++) {
			Qp->rx[s].addr = (u64)(Qp->rxbuf + s * p_bufsize);
			Qp->rx[s].word = 0;
			Qp->tx[s].addr = (u64)(Qp->txbuf + s * p_bufsize);
			Qp->tx[s].word = 0;
		}
		cbar();
		wr64(Q(q, Q_RX_BASE), (u64)Qp->rx);
		wr32(Q(q, Q_RX_LEN), (u32)p_ring);
		wr64(Q(q, Q_TX_BASE), (u64)Qp->tx);
		wr32(Q(q, Q_TX_LEN), (u32)p_ring);
		wr32(Q(q, Q_RX_ENABLE), 1);
		wr32(Q(q, Q_TX_ENABLE), 1);
		if (!rd32(Q(q, Q_RX_ENABLE)) || !rd32(Q(q, Q_TX_ENABLE)))
			fail("queue did not enable", 1);
		Qp->rx_rung = (u32)(p_ring - 1);        /* all slots but one posted */
		wr32(Q(q, Q_RX_TAIL), Qp->rx_rung);
	}
	u64 end = at;
	int fits = 0;
	for (int i = 0; i < ram_nregions; i++)
		if (ram_regions[i].base <= AREA_START && ram_regions[i].base + ram_regions[i].len >= end)
			fits = 1;
	if (!fits)
		fail("rings and buffers do not fit in RAM", 2);
	wr32(REG_CTRL, CTRL_ENABLE);
	rt_puts("netecho: VF in slot ");
	rt_put_dec(p_dev);
	rt_puts(" version=");
	rt_put_dec(rd32(REG_VERSION));
	rt_puts(" mac=");
	for (int i = 0; i < 6; i++) {
		rt_put_hex(mac[i], 2);
		if (i < 5)
			rt_putc(':');
	}
	rt_puts(" vlan=");
	rt_put_dec(rd32(REG_PORT_VLAN));
	rt_puts(" queues=");
	rt_put_dec(nq);
	rt_puts(" ring=");
	rt_put_dec(p_ring);
	rt_puts("\n");
}

/* A free TX slot on queue q (reclaiming what the device has sent). */
static u32 tx_slot(struct queue *Qp, u32 q)
{
	u32 mask = (u32)p_ring - 1;
	for (;;) {
		while (Qp->tx_clean != Qp->tx_next && (Qp->tx[Qp->tx_clean].word & TXD_DD))
			Qp->tx_clean = (Qp->tx_clean + 1) & mask;
		if (((Qp->tx_next + 1) & mask) != Qp->tx_clean)
			return Qp->tx_next;
		if (Qp->tx_rung != Qp->tx_next) {
			cbar();
			wr32(Q(q, Q_TX_TAIL), Qp->tx_next);
			Qp->tx_rung = Qp->tx_next;
		}
		if (rd32(REG_STATUS) & STATUS_ERROR)
			fail("device error while waiting for TX", 1);
		__asm__ volatile("pause" ::: "memory");
	}
}

static void send(struct queue *Qp, u32 q, const u8 *frame_in, u32 len, u32 magic, const u8 *extra)
{
	u32 slot = tx_slot(Qp, q);
	u8 *out = Qp->txbuf + (u64)slot * p_bufsize;
	memcpy(out, frame_in + 6, 6);           /* back to the sender */
	memcpy(out + 6, mac, 6);
	memcpy(out + 12, frame_in + 12, 2);
	*(u32 *)(out + 14) = magic;
	memcpy(out + 18, frame_in + 18, HDR_LEN - 18);
	if (extra) {
		memcpy(out + HDR_LEN, extra, len - HDR_LEN);
	} else {
		const u8 *in = frame_in + HDR_LEN;
		u32 n = len - HDR_LEN, i = 0;
		for (; i + 8 <= n; i += 8)
			*(u64 *)(out + HDR_LEN + i) = *(const u64 *)(in + i) ^ 0x5a5a5a5a5a5a5a5aUL;
		for (; i < n; i++)
			out[HDR_LEN + i] = in[i] ^ 0x5a;
	}
	Qp->tx[slot].addr = (u64)out;
	cbar();
	Qp->tx[slot].word = len | TXD_EOP | TXD_RS;
	Qp->tx_next = (slot + 1) & ((u32)p_ring - 1);
}

static void handle(struct queue *Qp, u32 q, const u8 *fr, u32 len)
{
	if (len < HDR_LEN || fr[12] != (ETHERTYPE >> 8) || fr[13] != (ETHERTYPE & 0xff) ||
	    memcmp(fr, mac, 6) != 0) {
		n_bad++;
		return;
	}
	u32 magic = *(const u32 *)(fr + 14);
	if (magic == MAGIC_PING) {
		u64 seq = *(const u64 *)(fr + 22);
		h_count++;
		h_total += mix64(seq + 0x9e3779b97f4a7c15UL);
		h_xor ^= mix64(seq ^ 0x5555555555555555UL);
		n_rx++;
		send(Qp, q, fr, len, MAGIC_ECHO, 0);
		n_tx++;
		if (p_frames && n_rx >= p_frames)
			stopping = 1;
	} else if (magic == MAGIC_STOP) {
		u64 body[4] = {n_rx, n_tx, n_bad, result_value()};
		send(Qp, q, fr, HDR_LEN + sizeof(body), MAGIC_RESULT, (const u8 *)body);
		stopping = 1;
	} else {
		n_bad++;
	}
}

/* Frames completed on queue q, up to BATCH; returns how many. */
static u32 poll_queue(u32 q)
{
	struct queue *Qp = &qs[q];
	u32 mask = (u32)p_ring - 1, n = 0;
	while (n < BATCH) {
		volatile struct desc *d = &Qp->rx[Qp->rx_next];
		u64 w = d->word;
		if (!(w & RXD_DD))
			break;
		cbar();
		handle(Qp, q, Qp->rxbuf + (u64)Qp->rx_next * p_bufsize, (u32)(w & 0xffff));
		d->word = 0;                    /* give the slot back, posted at the next doorbell */
		Qp->rx_next = (Qp->rx_next + 1) & mask;
		n++;
	}
	if (n) {
		cbar();
		if (Qp->tx_rung != Qp->tx_next) {
			wr32(Q(q, Q_TX_TAIL), Qp->tx_next);
			Qp->tx_rung = Qp->tx_next;
		}
		u32 tail = (Qp->rx_next - 1) & mask;
		if (tail != Qp->rx_rung) {
			wr32(Q(q, Q_RX_TAIL), tail);
			Qp->rx_rung = tail;
		}
	}
	return n;
}

static void flush_tx(void)
{
	u64 t0 = rdtsc(), khz = tsc_khz();
	for (u32 q = 0; q < nq; q++) {
		struct queue *Qp = &qs[q];
		while (Qp->tx_clean != Qp->tx_next) {
			if (Qp->tx[Qp->tx_clean].word & TXD_DD)
				Qp->tx_clean = (Qp->tx_clean + 1) & ((u32)p_ring - 1);
			else if (rdtsc() - t0 > khz * 1000)
				return;                 /* a second: report what we have anyway */
			else
				halt_us(100);
		}
	}
}

void guest_main(int vcpu, int nvcpus)
{
	(void)nvcpus;
	if (vcpu != 0)
		park_forever();
	params();
	find_device();
	setup();
	u64 khz = tsc_khz(), last = rdtsc(), idle_spins = 0;
	while (!stopping) {
		u32 got = 0;
		for (u32 q = 0; q < nq; q++)
			got += poll_queue(q);
		if (got) {
			last = rdtsc();
			idle_spins = 0;
			continue;
		}
		/* spin on memory (no exits) for a while, then doze briefly */
		if (++idle_spins < 2000) {
			__asm__ volatile("pause" ::: "memory");
			continue;
		}
		idle_spins = 0;
		if (rd32(REG_STATUS) & STATUS_ERROR)
			fail("device reports an error", 1);
		if (p_idle && rdtsc() - last > p_idle * khz * 1000)
			fail("no frame for too long (idle timeout)", 1);
		halt_us(50);
	}
	flush_tx();
	rt_puts("netecho: received=");
	rt_put_dec(n_rx);
	rt_puts(" echoed=");
	rt_put_dec(n_tx);
	rt_puts(" bad=");
	rt_put_dec(n_bad);
	rt_puts(" device_rx=");
	rt_put_dec(rd64(REG_RX_PACKETS));
	rt_puts(" device_tx=");
	rt_put_dec(rd64(REG_TX_PACKETS));
	rt_puts(" icr=0x");
	rt_put_hex(rd32(REG_ICR), 1);
	rt_puts("\n");
	rt_puts("RESULT ");
	rt_put_hex(result_value(), 16);
	rt_puts("\n");
	debug_exit(0);
}

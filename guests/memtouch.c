/*
 * memtouch: dirties a working set at a controlled rate and proves, with one
 * RESULT line, that memory contents and SSE register state survived.
 *
 * Parameters (command line):
 *   wss=SIZE        working set (K/M/G suffix), default 64M; laid over usable RAM from 16 MiB
 *   pattern=seq|random   page order of rounds >= 1, default seq
 *   seed=N          default 1
 *   rate=MB/s       total over all vCPUs (1 MB = 10^6 bytes, 4 KiB counted per touched
 *                   page), 0 = unlimited, default 0
 *   rounds=N        rounds 0 .. N-1 (round 0 fills every page), default 10
 *   vcpus=N         (runtime) override the vCPU count
 *
 * RESULT depends only on the parameters and the vCPU count.
 */
#include "rt.h"
#include <emmintrin.h>

#define WSS_START   (16UL << 20)
#define PAGE_SHIFT  12
#define PAGE_SIZE   (1UL << PAGE_SHIFT)

/* ---- working-set page index -> physical (= virtual) address ---- */
struct seg {
	u64 first;      /* first working-set page index in this segment */
	u64 npages;
	u64 base;       /* physical address of that page */
};
static struct seg segs[RT_MAX_REGIONS];
static int nsegs;

static u64 p_wss, p_npages, p_seed, p_rate, p_rounds;
static int p_random;

struct slot {
	volatile u64 acc, mem, done;
} __attribute__((aligned(64)));
static struct slot slots[RT_MAX_VCPUS];
static volatile u64 go;

static inline u8 *page_addr(u64 pg)
{
	const struct seg *s = segs;
	while (pg - s->first >= s->npages)
		s++;
	return (u8 *)(s->base + ((pg - s->first) << PAGE_SHIFT));
}

static u64 gcd(u64 x, u64 y)
{
	while (y) {
		u64 t = x % y;
		x = y;
		y = t;
	}
	return x;
}

/* xorshift32 on four independent lanes (lanes must start non-zero) */
static inline __m128i xs_step(__m128i s)
{
	s = _mm_xor_si128(s, _mm_slli_epi32(s, 13));
	s = _mm_xor_si128(s, _mm_srli_epi32(s, 17));
	s = _mm_xor_si128(s, _mm_slli_epi32(s, 5));
	return s;
}

static inline __m128i xs_seed(u64 h)
{
	u64 h2 = mix64(h ^ 0x6a09e667f3bcc908UL);
	/* force every 32-bit lane non-zero */
	const __m128i one = _mm_set1_epi32(1);
	return _mm_or_si128(_mm_set_epi64x((long long)h, (long long)h2), one);
}

/*
 * Order-sensitive checksum step over two XMM accumulators: `a` sums,
 * `b` absorbs a lane-swapped `a` and rotates, so order and every bit count.
 */
#define MIX(a, b, v)                                                             \
	do {                                                                     \
		(a) = _mm_add_epi64((a), (v));                                   \
		(b) = _mm_xor_si128((b), _mm_shuffle_epi32((a), 0x4E));          \
		(b) = _mm_or_si128(_mm_slli_epi64((b), 9), _mm_srli_epi64((b), 55)); \
	} while (0)

static u64 fold(__m128i a, __m128i b)
{
	u64 t[4];
	_mm_storeu_si128((__m128i *)&t[0], a);
	_mm_storeu_si128((__m128i *)&t[2], b);
	return mix64(t[0] ^ mix64(t[1] ^ mix64(t[2] ^ mix64(t[3] + 0x243f6a8885a308d3UL))));
}

/* ---- rate limiting: per-vCPU token schedule in TSC ticks ---- */
struct rlim {
	u64 bps;            /* bytes/s for this vCPU; 0 = off */
	u64 deadline, step, rem, frac, maxdebt, khz;
};

static void rl_init(struct rlim *r, u64 bps)
{
	r->bps = bps;
	if (!bps)
		return;
	r->khz = tsc_khz();
	u64 num = 16 * PAGE_SIZE * r->khz * 1000;   /* ticks*bytes/s per 16 pages */
	r->step = num / bps;
	r->rem = num % bps;
	r->frac = 0;
	r->maxdebt = r->khz * 50;                   /* allow at most 50 ms of catch-up */
	r->deadline = rdtsc();
}

static void rl_tick16(struct rlim *r)
{
	r->deadline += r->step;
	r->frac += r->rem;
	if (r->frac >= r->bps) {
		r->frac -= r->bps;
		r->deadline++;
	}
	u64 now = rdtsc();
	if (now > r->deadline + r->maxdebt)
		r->deadline = now - r->maxdebt;
	while (now < r->deadline) {
		u64 us = (r->deadline - now) * 1000 / r->khz;
		if (us == 0)
			us = 1;
		if (us > 10000)
			us = 10000;
		halt_us((u32)us);
		now = rdtsc();
	}
}

/* ---- the workload of one vCPU over pages [lo, hi) ---- */
static void run_share(int vcpu, int nvcpus, u64 lo, u64 hi)
{
	u64 n = hi - lo;
	struct rlim rl;
	u64 counted = 0;
	rl_init(&rl, p_rate * 1000000UL / (u64)nvcpus);

	__m128i a = _mm_set_epi64x((long long)mix64(p_seed ^ 0x1111), (long long)mix64(p_wss + 0x2222));
	__m128i b = _mm_set_epi64x((long long)mix64(p_rounds * 3 + (u64)p_random),
				   (long long)mix64(((u64)vcpu << 32) | (u64)nvcpus));

	/* round 0: fill every page of the share */
	for (u64 pg = lo; pg < hi; pg++) {
		__m128i *p = (__m128i *)page_addr(pg);
		__m128i s = xs_seed(mix64(p_seed * 0x9e3779b97f4a7c15UL + pg));
		for (int i = 0; i < (int)(PAGE_SIZE / 16); i++) {
			s = xs_step(s);
			_mm_store_si128(p + i, s);
			MIX(a, b, s);
		}
		if (rl.bps && (++counted & 15) == 0)
			rl_tick16(&rl);
	}

	/*
	 * rounds >= 1: rewrite every page of the share once, whole, as a real
	 * workload that dirties memory does (and so the data moved by a migration
	 * is what the guest last wrote, not mostly round-0 contents).
	 */
	for (u64 r = 1; r < p_rounds; r++) {
		u64 step = 1, pos = 0;
		if (p_random && n > 1) {
			u64 h = mix64(p_seed * 0xd1b54a32d192ed03UL + r);
			step = 1 + h % (n - 1);
			while (gcd(step, n) != 1)
				step = step + 1 < n ? step + 1 : 1;
			pos = mix64(h) % n;
		}
		u64 rk = mix64(r * 0xa0761d6478bd642fUL + p_seed);
		for (u64 k = 0; k < n; k++) {
			u64 pg = lo + pos;
			pos += step;
			if (pos >= n)
				pos -= n;
			__m128i *p = (__m128i *)page_addr(pg);
			__m128i s = xs_seed(mix64(rk ^ (pg * 0xe7037ed1a0b428dbUL)));
			for (int i = 0; i < (int)(PAGE_SIZE / 16); i++) {
				s = xs_step(s);
				_mm_store_si128(p + i, s);
				MIX(a, b, s);
			}
			if (rl.bps && (++counted & 15) == 0)
				rl_tick16(&rl);
		}
	}
	u64 acc = fold(a, b);

	/* read back the whole share from memory */
	__m128i c = _mm_set_epi64x(0x452821e638d01377L, (long long)lo);
	__m128i d = _mm_set_epi64x((long long)hi, 0x13198a2e03707344L);
	for (u64 pg = lo; pg < hi; pg++) {
		const __m128i *p = (const __m128i *)page_addr(pg);
		for (int i = 0; i < (int)(PAGE_SIZE / 16); i++)
			MIX(c, d, _mm_load_si128(p + i));
	}
	u64 mem = fold(c, d);

	slots[vcpu].acc = acc;
	slots[vcpu].mem = mem;
	__atomic_store_n(&slots[vcpu].done, 1, __ATOMIC_RELEASE);
}

static __attribute__((noreturn)) void fail(const char *msg)
{
	rt_puts("memtouch: ERROR ");
	rt_puts(msg);
	rt_puts("\n");
	debug_exit(2);
}

static void setup(int nvcpus)
{
	char pat[16];
	int err = 0;
	p_wss = cmd_get_u64("wss", 64UL << 20, &err);
	p_seed = cmd_get_u64("seed", 1, &err);
	p_rate = cmd_get_u64("rate", 0, &err);
	p_rounds = cmd_get_u64("rounds", 10, &err);
	if (err)
		fail("malformed number on the command line");
	p_random = 0;
	if (cmd_get_str("pattern", pat, sizeof(pat))) {
		if (!strcmp(pat, "random"))
			p_random = 1;
		else if (strcmp(pat, "seq"))
			fail("pattern must be seq or random");
	}
	if (p_rounds < 1)
		fail("rounds must be >= 1");
	if (p_wss < PAGE_SIZE)
		fail("wss must be at least 4K");

	rt_puts("memtouch: vcpus=");
	rt_put_dec((u64)nvcpus);
	rt_puts(" wss=");
	rt_put_dec(p_wss);
	rt_puts(p_random ? " pattern=random" : " pattern=seq");
	rt_puts(" seed=");
	rt_put_dec(p_seed);
	rt_puts(" rate=");
	rt_put_dec(p_rate);
	rt_puts(" rounds=");
	rt_put_dec(p_rounds);
	rt_puts("\n");

	p_npages = (p_wss + PAGE_SIZE - 1) >> PAGE_SHIFT;
	u64 have = 0;
	for (int i = 0; i < ram_nregions && have < p_npages; i++) {
		u64 base = ram_regions[i].base, end = base + ram_regions[i].len;
		if (end <= WSS_START)
			continue;
		if (base < WSS_START)
			base = WSS_START;
		u64 np = (end - base) >> PAGE_SHIFT;
		if (np > p_npages - have)
			np = p_npages - have;
		segs[nsegs].first = have;
		segs[nsegs].npages = np;
		segs[nsegs].base = base;
		nsegs++;
		have += np;
	}
	if (have < p_npages) {
		rt_puts("memtouch: ERROR wss=");
		rt_put_dec(p_wss);
		rt_puts(" does not fit: only ");
		rt_put_dec(have << PAGE_SHIFT);
		rt_puts(" bytes of RAM above 16 MiB\n");
		debug_exit(2);
	}
}

void guest_main(int vcpu, int nvcpus)
{
	if (vcpu == 0) {
		setup(nvcpus);
		__atomic_store_n(&go, 1, __ATOMIC_RELEASE);
	} else {
		while (!__atomic_load_n(&go, __ATOMIC_ACQUIRE))
			halt_us(100);
	}

	u64 lo = p_npages * (u64)vcpu / (u64)nvcpus;
	u64 hi = p_npages * (u64)(vcpu + 1) / (u64)nvcpus;
	run_share(vcpu, nvcpus, lo, hi);

	if (vcpu != 0)
		park_forever();

	u64 r = 0x6d656d746f756368UL;     /* "memtouch" */
	for (int v = 0; v < nvcpus; v++) {
		while (!__atomic_load_n(&slots[v].done, __ATOMIC_ACQUIRE))
			halt_us(1000);
		r = mix64(r ^ slots[v].acc);
		r = mix64(r ^ slots[v].mem);
	}
	rt_puts("RESULT ");
	rt_put_hex(r, 16);
	rt_puts("\n");
	debug_exit(0);
}

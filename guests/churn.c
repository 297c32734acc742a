/*
 * churn: rewrites a working set as fast as it can, checking every page before it
 * rewrites it, and prints a progress counter the host can time.
 *
 * The load of `vmferry bench postcopy`: a guest that dirties memory faster than the
 * link carries it, whose own speed across a migration is what post-copy is for. Every
 * PROGRESS line gives the pages rewritten so far (all rounds, round 0 included) and the
 * pages found wrong; the host timestamps the lines as they appear, on the source's
 * console and then on the destination's (the counter lives in guest memory, so it goes
 * on where it stopped).
 *
 * Each page of round r >= 1 must still hold what round r-1 wrote there (both are
 * derived from the seed, the round and the page): a page a migration delivered stale,
 * zeroed or half-written is counted as bad and the first few are named. So the guest
 * need not end for its memory to be checked, and the bench can stop it at any time.
 *
 * Parameters (command line):
 *   wss=SIZE     working set (K/M/G suffix), default 1G; laid over usable RAM from 16 MiB
 *   seed=N       default 1
 *   report=N     a PROGRESS line every N pages, default 8192 (32 MiB)
 *   rounds=N     rounds 0 .. N-1, then "DONE <pages> <bad>" and exit (0: all good,
 *                3: bad pages); 0 = for ever (the default)
 *
 * Output: "churn: wss=… pages=… report=… seed=…", then "PROGRESS <pages> <bad>" lines
 * and "BAD page=<index> round=<r>" for the first 8 bad pages.
 */
#include "rt.h"
#include <emmintrin.h>

#define WSS_START   (16UL << 20)
#define PAGE_SHIFT  12
#define PAGE_SIZE   (1UL << PAGE_SHIFT)
#define WORDS       ((int)(PAGE_SIZE / 16))
#define NAMED_BAD   8

struct seg {
	u64 first;      /* first working-set page index in this segment */
	u64 npages;
	u64 base;       /* physical (= virtual) address of that page */
};
static struct seg segs[RT_MAX_REGIONS];
static int nsegs;
static u64 p_npages, p_seed, p_report, p_rounds;

static inline u8 *page_addr(u64 pg)
{
	const struct seg *s = segs;
	while (pg - s->first >= s->npages)
		s++;
	return (u8 *)(s->base + ((pg - s->first) << PAGE_SHIFT));
}

/* xorshift32 on four lanes; every lane of a seed is non-zero */
static inline __m128i xs_step(__m128i s)
{
	s = _mm_xor_si128(s, _mm_slli_epi32(s, 13));
	s = _mm_xor_si128(s, _mm_srli_epi32(s, 17));
	s = _mm_xor_si128(s, _mm_slli_epi32(s, 5));
	return s;
}

/* The first state of page pg's stream in round r. */
static inline __m128i page_seed(u64 r, u64 pg)
{
	u64 h = mix64(mix64(p_seed * 0x9e3779b97f4a7c15UL + r) ^ (pg * 0xe7037ed1a0b428dbUL));
	u64 h2 = mix64(h ^ 0x6a09e667f3bcc908UL);
	return _mm_or_si128(_mm_set_epi64x((long long)h, (long long)h2), _mm_set1_epi32(1));
}

static void fill_page(u64 pg)
{
	__m128i *p = (__m128i *)page_addr(pg);
	__m128i s = page_seed(0, pg);
	for (int i = 0; i < WORDS; i++) {
		s = xs_step(s);
		_mm_store_si128(p + i, s);
	}
}

/* Rewrite page pg for round r; 1 if it did not hold round r-1's contents. */
static int rewrite_page(u64 r, u64 pg)
{
	__m128i *p = (__m128i *)page_addr(pg);
	__m128i old = page_seed(r - 1, pg), s = page_seed(r, pg);
	__m128i diff = _mm_setzero_si128();
	for (int i = 0; i < WORDS; i++) {
		old = xs_step(old);
		s = xs_step(s);
		diff = _mm_or_si128(diff, _mm_xor_si128(_mm_load_si128(p + i), old));
		_mm_store_si128(p + i, s);
	}
	return _mm_movemask_epi8(_mm_cmpeq_epi8(diff, _mm_setzero_si128())) != 0xFFFF;
}

static void progress(u64 done, u64 bad)
{
	rt_puts("PROGRESS ");
	rt_put_dec(done);
	rt_puts(" ");
	rt_put_dec(bad);
	rt_puts("\n");
}

static __attribute__((noreturn)) void fail(const char *msg)
{
	rt_puts("churn: ERROR ");
	rt_puts(msg);
	rt_puts("\n");
	debug_exit(2);
}

static void setup(void)
{
	int err = 0;
	u64 wss = cmd_get_u64("wss", 1UL << 30, &err);
	p_seed = cmd_get_u64("seed", 1, &err);
	p_report = cmd_get_u64("report", 8192, &err);
	p_rounds = cmd_get_u64("rounds", 0, &err);
	if (err)
		fail("malformed number on the command line");
	if (wss < PAGE_SIZE)
		fail("wss must be at least 4K");
	if (p_report == 0)
		fail("report must be at least 1");
	p_npages = (wss + PAGE_SIZE - 1) >> PAGE_SHIFT;
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
	if (have < p_npages)
		fail("wss does not fit in the RAM above 16 MiB");
	rt_puts("churn: wss=");
	rt_put_dec(p_npages << PAGE_SHIFT);
	rt_puts(" pages=");
	rt_put_dec(p_npages);
	rt_puts(" report=");
	rt_put_dec(p_report);
	rt_puts(" seed=");
	rt_put_dec(p_seed);
	rt_puts("\n");
}

void guest_main(int vcpu, int nvcpus)
{
	(void)nvcpus;
	if (vcpu != 0)
		park_forever();     /* one writer: QEMU starts only vCPU 0 of a multiboot image */
	setup();
	u64 done = 0, bad = 0;
	for (u64 pg = 0; pg < p_npages; pg++) {
		fill_page(pg);
		if (++done % p_report == 0)
			progress(done, bad);
	}
	for (u64 r = 1; p_rounds == 0 || r < p_rounds; r++) {
		for (u64 pg = 0; pg < p_npages; pg++) {
			if (rewrite_page(r, pg)) {
				if (bad++ < NAMED_BAD) {
					rt_puts("BAD page=");
					rt_put_dec(pg);
					rt_puts(" round=");
					rt_put_dec(r);
					rt_puts("\n");
				}
			}
			if (++done % p_report == 0)
				progress(done, bad);
		}
	}
	rt_puts("DONE ");
	rt_put_dec(done);
	rt_puts(" ");
	rt_put_dec(bad);
	rt_puts("\n");
	debug_exit(bad ? 3 : 0);
}

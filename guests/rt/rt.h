/* vmferry guest runtime API (ring 3, 64-bit, identity-mapped, polled I/O). */
#ifndef RT_H
#define RT_H

#include "rt_layout.h"

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long s64;
typedef unsigned long size_t;

#define NULL ((void *)0)

/* Supplied by each image. Runs in ring 3 on every vCPU. When it returns,
 * vCPU 0 ends the run with debug_exit(0); other vCPUs park forever. */
void guest_main(int vcpu, int nvcpus);

/* ---- port I/O (IOPL=3) ---- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

/* ---- exit / halt / time ---- */
__attribute__((noreturn)) void debug_exit(u32 v);
static inline void halt_us(u32 us) { outl(0x4F0, us); }
__attribute__((noreturn)) void park_forever(void);

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}
u64 tsc_khz(void);
void delay_us(u64 us);          /* TSC-timed; waits with halt_us */

/*
 * CPUID as seen from ring 0, recorded by vCPU 0 during set-up. Use this, not
 * the cpuid() instruction: on kvm_pvm, CPUID in ring 3 returns the host's values.
 */
struct rt_cpuid_info {
	u32 l1_eax, l1_ebx, l1_ecx, l1_edx;     /* leaf 1 */
	u32 hv_max;                             /* leaf 0x40000000 EAX */
	u32 hv_tsc_khz;                         /* leaf 0x40000010 EAX, 0 if absent */
	u32 ext_max;                            /* leaf 0x80000000 EAX */
	u32 ext_ecx, ext_edx;                   /* leaf 0x80000001 */
};
extern struct rt_cpuid_info rt_cpuid;

/* raw CPUID from the current ring (ring 3: unreliable on kvm_pvm, see above) */
static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

/* ---- serial console (COM1) ---- */
void rt_putc(char c);
void rt_puts(const char *s);
void rt_put_hex(u64 v, int digits);     /* lowercase, exactly `digits` digits (1..16) */
void rt_put_dec(u64 v);
/* console lock, for multi-vCPU output that must not interleave */
void console_lock(void);
void console_unlock(void);

/* ---- command line ---- */
const char *cmdline(void);
/* Copies the value of `key=` (up to the next space) into buf; returns 1 if found. */
int cmd_get_str(const char *key, char *buf, int buflen);
/* Value of `key=` as a number (decimal or 0x hex) with optional K/M/G/T suffix
 * (binary multiples); `def` if absent; sets *err (if given) on a malformed value. */
u64 cmd_get_u64(const char *key, u64 def, int *err);
int parse_u64(const char *s, u64 *out);  /* same syntax; returns 1 if ok */

/* ---- RAM (usable ranges from the multiboot map, page aligned, sorted) ---- */
struct ram_region {
	u64 base;
	u64 len;
};
#define RT_MAX_REGIONS 32
extern int ram_nregions;
extern struct ram_region ram_regions[RT_MAX_REGIONS];

/* ---- vCPUs ---- */
int rt_nvcpus(void);

typedef struct { volatile u32 v; } spinlock_t;
static inline void spin_lock(spinlock_t *l)
{
	while (__atomic_exchange_n(&l->v, 1, __ATOMIC_ACQUIRE))
		while (l->v)
			__asm__ volatile("pause");
}
static inline void spin_unlock(spinlock_t *l) { __atomic_store_n(&l->v, 0, __ATOMIC_RELEASE); }
/* lock xadd; returns the old value */
static inline u64 atomic_add(volatile u64 *p, u64 v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline u64 atomic_load(volatile u64 *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }

/* A 64-bit mixing function (splitmix64's finaliser): the guests' deterministic data. */
static inline u64 mix64(u64 z)
{
	z ^= z >> 30;
	z *= 0xbf58476d1ce4e5b9UL;
	z ^= z >> 27;
	z *= 0x94d049bb133111ebUL;
	z ^= z >> 31;
	return z;
}
/* All nvcpus vCPUs wait here for each other (halt_us polling). */
void barrier_wait(void);

/* ---- string helpers (also what gcc may call) ---- */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);

#endif

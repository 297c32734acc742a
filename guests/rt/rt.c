/* vmferry guest runtime, ring-3 C part. */
#include "rt.h"

/* set by entry.S */
extern volatile u64 rt_release;
extern u64 rt_mbi_addr;

int ram_nregions;
struct ram_region ram_regions[RT_MAX_REGIONS];

static char cmdline_buf[1024];
static int nvcpus = 1;
static u64 khz;
static spinlock_t console;

/* ------------------------------------------------------------ strings */
void *memset(void *d, int c, size_t n)
{
	u8 *p = d;
	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
	u8 *p = d;
	const u8 *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}

void *memmove(void *d, const void *s, size_t n)
{
	u8 *p = d;
	const u8 *q = s;
	if (p < q) {
		while (n--)
			*p++ = *q++;
	} else {
		while (n--)
			p[n] = q[n];
	}
	return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const u8 *p = a, *q = b;
	for (; n; n--, p++, q++)
		if (*p != *q)
			return *p - *q;
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}

int strcmp(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return (u8)*a - (u8)*b;
}

/* ------------------------------------------------------------ console */
void rt_putc(char c)
{
	while (!(inb(0x3FD) & 0x20))
		;
	outb(0x3F8, (u8)c);
}

void rt_puts(const char *s)
{
	while (*s)
		rt_putc(*s++);
}

void rt_put_hex(u64 v, int digits)
{
	if (digits < 1)
		digits = 1;
	if (digits > 16)
		digits = 16;
	for (int i = digits - 1; i >= 0; i--)
		rt_putc("0123456789abcdef"[(v >> (4 * i)) & 0xF]);
}

void rt_put_dec(u64 v)
{
	char buf[21];
	int i = 20;
	buf[i] = 0;
	do {
		buf[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	rt_puts(buf + i);
}

void console_lock(void) { spin_lock(&console); }
void console_unlock(void) { spin_unlock(&console); }

/* ------------------------------------------------------------ exit / time */
void debug_exit(u32 v)
{
	for (;;) {
		outl(0xF4, v);
		halt_us(0);
	}
}

void park_forever(void)
{
	for (;;)
		halt_us(1000);
}

u64 tsc_khz(void) { return khz; }

void delay_us(u64 us)
{
	u64 start = rdtsc();
	u64 ticks = us * khz / 1000;
	for (;;) {
		u64 el = rdtsc() - start;
		if (el >= ticks)
			return;
		u64 left = (ticks - el) * 1000 / khz;
		if (left == 0)
			left = 1;
		if (left > 100000)
			left = 100000;
		halt_us((u32)left);
	}
}

int rt_nvcpus(void) { return nvcpus; }

/* ------------------------------------------------------------ cmdline */
const char *cmdline(void) { return cmdline_buf; }

/* Points at the value of `key=` or NULL. A key matches only at a token start. */
static const char *find_key(const char *key)
{
	size_t kl = strlen(key);
	const char *p = cmdline_buf;
	while (*p) {
		while (*p == ' ')
			p++;
		if (!*p)
			break;
		if (!memcmp(p, key, kl) && p[kl] == '=')
			return p + kl + 1;
		while (*p && *p != ' ')
			p++;
	}
	return NULL;
}

int cmd_get_str(const char *key, char *buf, int buflen)
{
	const char *v = find_key(key);
	int i = 0;
	if (!v)
		return 0;
	while (v[i] && v[i] != ' ' && i < buflen - 1) {
		buf[i] = v[i];
		i++;
	}
	buf[i] = 0;
	return 1;
}

int parse_u64(const char *s, u64 *out)
{
	u64 v = 0;
	int base = 10, nd = 0;
	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
	}
	for (;; s++) {
		int d;
		char c = *s;
		if (c >= '0' && c <= '9')
			d = c - '0';
		else if (base == 16 && c >= 'a' && c <= 'f')
			d = c - 'a' + 10;
		else if (base == 16 && c >= 'A' && c <= 'F')
			d = c - 'A' + 10;
		else
			break;
		v = v * base + d;
		nd++;
	}
	if (!nd)
		return 0;
	switch (*s) {
	case 'k': case 'K': v <<= 10; s++; break;
	case 'm': case 'M': v <<= 20; s++; break;
	case 'g': case 'G': v <<= 30; s++; break;
	case 't': case 'T': v <<= 40; s++; break;
	}
	if (*s == 'i' || *s == 'b' || *s == 'B') /* accept KiB / KB spellings */
		s++;
	if (*s == 'B')
		s++;
	if (*s && *s != ' ')
		return 0;
	*out = v;
	return 1;
}

u64 cmd_get_u64(const char *key, u64 def, int *err)
{
	const char *v = find_key(key);
	u64 r;
	if (!v)
		return def;
	if (!parse_u64(v, &r)) {
		if (err)
			*err = 1;
		return def;
	}
	return r;
}

/* ------------------------------------------------------------ multiboot */
struct mb_info {
	u32 flags, mem_lower, mem_upper, boot_device, cmdline;
	u32 mods_count, mods_addr, syms[4];
	u32 mmap_length, mmap_addr;
	u32 drives_length, drives_addr, config_table, boot_loader_name;
} __attribute__((packed));

struct mb_mmap {
	u32 size;
	u64 base, len;
	u32 type;
} __attribute__((packed));

static void add_region(u64 base, u64 end)
{
	base = (base + 4095) & ~4095UL;
	end &= ~4095UL;
	if (end <= base || ram_nregions >= RT_MAX_REGIONS)
		return;
	int i = ram_nregions++;
	while (i > 0 && ram_regions[i - 1].base > base) {
		ram_regions[i] = ram_regions[i - 1];
		i--;
	}
	ram_regions[i].base = base;
	ram_regions[i].len = end - base;
}

static void merge_regions(void)
{
	int o = 0;
	for (int i = 0; i < ram_nregions; i++) {
		if (o && ram_regions[o - 1].base + ram_regions[o - 1].len >= ram_regions[i].base) {
			u64 e = ram_regions[i].base + ram_regions[i].len;
			u64 pe = ram_regions[o - 1].base + ram_regions[o - 1].len;
			if (e > pe)
				ram_regions[o - 1].len = e - ram_regions[o - 1].base;
		} else {
			ram_regions[o++] = ram_regions[i];
		}
	}
	ram_nregions = o;
}

static int booted_by_qemu;

static void parse_mbi(void)
{
	const struct mb_info *mb = (const struct mb_info *)rt_mbi_addr;
	if (!mb)
		return;
	if (mb->flags & (1u << 2)) {
		const char *c = (const char *)(u64)mb->cmdline;
		int i = 0;
		while (c[i] && i < (int)sizeof(cmdline_buf) - 1) {
			cmdline_buf[i] = c[i] == '\t' || c[i] == '\n' ? ' ' : c[i];
			i++;
		}
		cmdline_buf[i] = 0;
	}
	if (mb->flags & (1u << 6)) {
		u64 p = mb->mmap_addr, end = p + mb->mmap_length;
		while (p < end) {
			const struct mb_mmap *e = (const struct mb_mmap *)p;
			if (e->type == 1)
				add_region(e->base, e->base + e->len);
			p += e->size + 4;
		}
	} else if (mb->flags & 1u) {
		add_region(0, (u64)mb->mem_lower << 10);
		add_region(0x100000, 0x100000 + ((u64)mb->mem_upper << 10));
	}
	merge_regions();
	if (mb->flags & (1u << 9)) {
		const char *n = (const char *)(u64)mb->boot_loader_name;
		booted_by_qemu = n && !memcmp(n, "qemu", 4);
	}
}

static u64 detect_tsc_khz(void)
{
	if (rt_cpuid.hv_tsc_khz)
		return rt_cpuid.hv_tsc_khz;
	u64 v = cmd_get_u64("tsc_khz", 0, NULL);
	return v ? v : 2000000;
}

/*
 * vcpus= on the command line wins; QEMU's multiboot loader (boot loader name
 * "qemu") starts only vCPU 0, whatever CPUID says (QEMU 7.2 reports HTT with
 * 2 logical CPUs even for -smp 1); otherwise CPUID.1 (read in ring 0) as the ABI says.
 */
static int detect_nvcpus(void)
{
	int n = 1;
	u64 v = cmd_get_u64("vcpus", 0, NULL);
	if (v)
		n = (int)(v > RT_MAX_VCPUS ? RT_MAX_VCPUS : v);
	else if (booted_by_qemu)
		n = 1;
	else if (rt_cpuid.l1_edx & (1u << 28))
		n = (rt_cpuid.l1_ebx >> 16) & 0xFF;
	if (n < 1)
		n = 1;
	if (n > RT_MAX_VCPUS)
		n = RT_MAX_VCPUS;
	return n;
}

/* ------------------------------------------------------------ barrier */
static volatile u64 bar_count, bar_gen;

void barrier_wait(void)
{
	u64 gen = atomic_load(&bar_gen);
	if (atomic_add(&bar_count, 1) + 1 == (u64)nvcpus) {
		bar_count = 0;
		atomic_add(&bar_gen, 1);
		return;
	}
	while (atomic_load(&bar_gen) == gen)
		halt_us(100);
}

/* ------------------------------------------------------------ start */
void rt_main(u64 vcpu);

void rt_main(u64 vcpu)
{
	static const u32 mxcsr_default = 0x1F80;
	__asm__ volatile("fninit; ldmxcsr %0" ::"m"(mxcsr_default));
	if (vcpu == 0) {
		parse_mbi();
		nvcpus = detect_nvcpus();
		khz = detect_tsc_khz();
		__atomic_store_n(&rt_release, 1, __ATOMIC_RELEASE);
	}
	guest_main((int)vcpu, nvcpus);
	if (vcpu == 0)
		debug_exit(0);
	park_forever();
}

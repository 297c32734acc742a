/*
 * cpustate: checks that vCPU register state survives one park on the halt
 * port (during which the VMM may save the vCPU, restore it elsewhere and
 * resume it). Parameter: park=MICROSECONDS (default 1000000).
 *
 * Output: "CPUSTATE OK checked=<N>" and exit 0, or one
 * "CPUSTATE CHANGED <reg> expected=<hex> got=<hex>" line per change, then
 * "CPUSTATE FAIL changed=<k>" and exit 1.
 */
#include "rt.h"
#include "cpustate.h"

void cs_run(void);

/* FS_BASE / GS_BASE point here (set by rt_ring0_hook) */
u64 cs_fs_area[2] __attribute__((aligned(64))) = { 0xF5F5000011112222UL, 0xF5F5333344445555UL };
u64 cs_gs_area[2] __attribute__((aligned(64))) = { 0x65650000AAAABBBBUL, 0x6565CCCCDDDDEEEEUL };

/* inputs of cs_run */
u32 cs_park_us;
u32 cs_have_rdtscp;
u16 cs_fcw = 0x0E7F;           /* round toward zero, 53-bit precision, all masked */
u32 cs_mxcsr;                  /* set in guest_main (DAZ only if supported) */
u32 cs_mxcsr_default = 0x1F80;
double cs_x87_vals[4] = { 1.5, -2.25, 3.14159265358979, 6.02214076e23 };
u64 cs_xmm_vals[32] __attribute__((aligned(16)));

/* outputs of cs_run */
u64 cs_tsc_before, cs_tsc_after, cs_cr0_before, cs_cr0_after;
u64 cs_flags_before, cs_flags_after;
u64 cs_gpr_got[13];
u64 cs_seg_got[4];
u32 cs_aux_got, cs_aux_before;
u64 cs_msr_rb[9];      /* ring-0 read-back of each MSR written by rt_ring0_hook */
u8 cs_fx_before[512] __attribute__((aligned(16)));
u8 cs_fx_after[512] __attribute__((aligned(16)));
static u8 fx_probe[512] __attribute__((aligned(16)));

static const char *const gpr_names[13] = {
	"rbx", "rcx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
};
static const u64 gpr_expected[13] = {
	CS_RBX, CS_RCX, CS_RSI, CS_RDI, CS_RBP, CS_R8, CS_R9,
	CS_R10, CS_R11, CS_R12, CS_R13, CS_R14, CS_R15,
};

static int checked, changed;

static void report(const char *name, int idx, const u8 *exp, const u8 *got, int nbytes)
{
	rt_puts("CPUSTATE CHANGED ");
	rt_puts(name);
	if (idx >= 0)
		rt_put_dec((u64)idx);
	rt_puts(" expected=");
	for (int i = nbytes - 1; i >= 0; i--)
		rt_put_hex(exp[i], 2);
	rt_puts(" got=");
	for (int i = nbytes - 1; i >= 0; i--)
		rt_put_hex(got[i], 2);
	rt_puts("\n");
}

/* compare nbytes (little endian, printed as one hex number) */
static void check(const char *name, int idx, const void *exp, const void *got, int nbytes)
{
	checked++;
	if (memcmp(exp, got, nbytes)) {
		changed++;
		report(name, idx, exp, got, nbytes);
	}
}

static void check64(const char *name, int idx, u64 exp, u64 got)
{
	check(name, idx, &exp, &got, 8);
}

void guest_main(int vcpu, int nvcpus)
{
	(void)nvcpus;
	if (vcpu != 0)
		park_forever();

	cs_park_us = (u32)cmd_get_u64("park", 1000000, NULL);
	cs_have_rdtscp = rt_cpuid.ext_max >= 0x80000001 && ((rt_cpuid.ext_edx >> 27) & 1);
	/* MXCSR: round toward zero, flush-to-zero, exceptions masked; DAZ if the mask allows */
	__asm__ volatile("fxsave64 %0" : "=m"(fx_probe));
	u32 mask;
	memcpy(&mask, fx_probe + 28, 4);
	if (!mask)
		mask = 0xFFBF;
	cs_mxcsr = 0x1F80 | 0x6000 | 0x8000 | (mask & 0x40);
	for (int i = 0; i < 32; i++)
		cs_xmm_vals[i] = 0x0A0B0C0D00000000UL ^ ((u64)(i / 2) << 56) ^ ((u64)(i & 1) << 44) ^
				 ((u64)(i * 0x1021 + 7) << 8);

	cs_run();

	static const char *const msr_names[9] = {
		"pat", "kernel_gs_base", "star", "lstar", "cstar", "sfmask", "fs_base", "gs_base", "tsc_aux",
	};
	const u64 msr_vals[9] = {
		CS_PAT, CS_KERNEL_GS_BASE, CS_STAR, CS_LSTAR, CS_CSTAR, CS_SFMASK,
		(u64)cs_fs_area, (u64)cs_gs_area, CS_TSC_AUX,
	};
	for (int i = 0; i < 9; i++) {
		if (i == 8 && !cs_have_rdtscp)
			continue;
		if (cs_msr_rb[i] != msr_vals[i]) {
			rt_puts("CPUSTATE NOTE msr ");
			rt_puts(msr_names[i]);
			rt_puts(" wrote ");
			rt_put_hex(msr_vals[i], 16);
			rt_puts(" read back ");
			rt_put_hex(cs_msr_rb[i], 16);
			rt_puts("\n");
		}
	}

	/* general-purpose registers */
	for (int i = 0; i < 13; i++)
		check64(gpr_names[i], -1, gpr_expected[i], cs_gpr_got[i]);
	/* flags: what went into the park (must include every bit set) */
	if ((cs_flags_before & CS_RFLAGS_SET) != CS_RFLAGS_SET) {
		check64("rflags_loaded", -1, cs_flags_before | CS_RFLAGS_SET, cs_flags_before);
		checked--;
	}
	check64("rflags", -1, cs_flags_before, cs_flags_after);

	/* x87 / SSE through FXSAVE: loaded values vs. the image after the park */
	u16 fcw_got, fsw_b, fsw_a;
	u32 mx_got;
	memcpy(&fcw_got, cs_fx_after + 0, 2);
	check("fcw", -1, &cs_fcw, &fcw_got, 2);
	memcpy(&fsw_b, cs_fx_before + 2, 2);
	memcpy(&fsw_a, cs_fx_after + 2, 2);
	check("fsw", -1, &fsw_b, &fsw_a, 2);
	check("ftw", -1, cs_fx_before + 4, cs_fx_after + 4, 1);
	memcpy(&mx_got, cs_fx_after + 24, 4);
	check("mxcsr", -1, &cs_mxcsr, &mx_got, 4);
	for (int i = 0; i < 8; i++)
		check("st", i, cs_fx_before + 32 + 16 * i, cs_fx_after + 32 + 16 * i, 10);
	for (int i = 0; i < 16; i++)
		check("xmm", i, &cs_xmm_vals[2 * i], cs_fx_after + 160 + 16 * i, 16);

	/* FS/GS bases, read through the segments */
	check64("fs_base_mem", 0, cs_fs_area[0], cs_seg_got[0]);
	check64("fs_base_mem", 1, cs_fs_area[1], cs_seg_got[1]);
	check64("gs_base_mem", 0, cs_gs_area[0], cs_seg_got[2]);
	check64("gs_base_mem", 1, cs_gs_area[1], cs_seg_got[3]);

	/* CR0 low word (SMSW): unchanged, NE and MP set */
	check64("cr0_low", -1, (cs_cr0_before & 0xFFFF) | 0x22, cs_cr0_after & 0xFFFF);

	/* TSC_AUX through RDTSCP */
	/*
	 * Only where RDTSCP saw the value before the park: kvm_pvm does not
	 * virtualize IA32_TSC_AUX (ring-0 read-back is 0, ring-3 RDTSCP returns
	 * the host CPU number).
	 */
	if (cs_have_rdtscp && cs_aux_before == CS_TSC_AUX)
		check64("tsc_aux", -1, CS_TSC_AUX, cs_aux_got);
	else if (cs_have_rdtscp) {
		rt_puts("CPUSTATE NOTE tsc_aux not checked: rdtscp before park gave ");
		rt_put_hex(cs_aux_before, 8);
		rt_puts("\n");
	}

	/* TSC must not go backwards across the park */
	checked++;
	if (cs_tsc_after < cs_tsc_before) {
		changed++;
		rt_puts("CPUSTATE CHANGED tsc expected=");
		rt_put_hex(cs_tsc_before, 16);
		rt_puts(" got=");
		rt_put_hex(cs_tsc_after, 16);
		rt_puts("\n");
	}

	if (changed) {
		rt_puts("CPUSTATE FAIL changed=");
		rt_put_dec((u64)changed);
		rt_puts("\n");
		debug_exit(1);
	}
	rt_puts("CPUSTATE OK checked=");
	rt_put_dec((u64)checked);
	rt_puts("\n");
	debug_exit(0);
}

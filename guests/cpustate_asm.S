/*
 * cpustate: ring-0 hook (distinctive control/MSR state) and the ring-3
 * routine that loads distinctive register values, parks once on the halt
 * port and records what the registers hold afterwards.
 */
#include "cpustate.h"

        .code64
        .text

/*
 * Called by the runtime on every vCPU in 64-bit ring 0, just before iretq.
 * FS/GS selectors are already loaded (null), so the bases set here stay.
 */
        .globl  rt_ring0_hook
rt_ring0_hook:
        pushq   %rbx
        movq    %cr0, %rax
        orq     $0x10020, %rax          /* WP | NE */
        movq    %rax, %cr0

/* write an MSR, read it back into cs_msr_rb[slot] (diagnostics only) */
#define WRMSR64(msr, val, slot)                 \
        movl    $(msr), %ecx;                   \
        movabsq $(val), %rax;                   \
        movq    %rax, %rdx;                     \
        shrq    $32, %rdx;                      \
        wrmsr;                                  \
        rdmsr;                                  \
        shlq    $32, %rdx;                      \
        orq     %rdx, %rax;                     \
        movq    %rax, cs_msr_rb + 8 * (slot)

        WRMSR64(0x277, CS_PAT, 0)               /* IA32_PAT */
        WRMSR64(0xC0000102, CS_KERNEL_GS_BASE, 1)
        WRMSR64(0xC0000081, CS_STAR, 2)
        WRMSR64(0xC0000082, CS_LSTAR, 3)
        WRMSR64(0xC0000083, CS_CSTAR, 4)
        WRMSR64(0xC0000084, CS_SFMASK, 5)
        WRMSR64(0xC0000100, cs_fs_area, 6)      /* FS_BASE */
        WRMSR64(0xC0000101, cs_gs_area, 7)      /* GS_BASE */

        /* IA32_TSC_AUX only where RDTSCP exists (else the write faults) */
        movl    $0x80000000, %eax
        cpuid
        cmpl    $0x80000001, %eax
        jb      1f
        movl    $0x80000001, %eax
        cpuid
        btl     $27, %edx
        jnc     1f
        WRMSR64(0xC0000103, CS_TSC_AUX, 8)
1:      popq    %rbx
        ret

/*
 * void cs_run(void): ring 3. Inputs and outputs are the globals in cpustate.c.
 */
        .globl  cs_run
cs_run:
        pushq   %rbx
        pushq   %rbp
        pushq   %r12
        pushq   %r13
        pushq   %r14
        pushq   %r15

        cmpl    $0, cs_have_rdtscp
        je      1f
        rdtscp
        movl    %ecx, cs_aux_before
        jmp     2f
1:      rdtsc
2:      shlq    $32, %rdx
        orq     %rdx, %rax
        movq    %rax, cs_tsc_before
        smsw    %rax
        movq    %rax, cs_cr0_before

        /* x87: non-default control word, four values on the stack */
        fninit
        fldcw   cs_fcw
        fldl    cs_x87_vals + 0
        fldl    cs_x87_vals + 8
        fldl    cs_x87_vals + 16
        fldl    cs_x87_vals + 24
        ldmxcsr cs_mxcsr

        movdqa  cs_xmm_vals + 0 * 16, %xmm0
        movdqa  cs_xmm_vals + 1 * 16, %xmm1
        movdqa  cs_xmm_vals + 2 * 16, %xmm2
        movdqa  cs_xmm_vals + 3 * 16, %xmm3
        movdqa  cs_xmm_vals + 4 * 16, %xmm4
        movdqa  cs_xmm_vals + 5 * 16, %xmm5
        movdqa  cs_xmm_vals + 6 * 16, %xmm6
        movdqa  cs_xmm_vals + 7 * 16, %xmm7
        movdqa  cs_xmm_vals + 8 * 16, %xmm8
        movdqa  cs_xmm_vals + 9 * 16, %xmm9
        movdqa  cs_xmm_vals + 10 * 16, %xmm10
        movdqa  cs_xmm_vals + 11 * 16, %xmm11
        movdqa  cs_xmm_vals + 12 * 16, %xmm12
        movdqa  cs_xmm_vals + 13 * 16, %xmm13
        movdqa  cs_xmm_vals + 14 * 16, %xmm14
        movdqa  cs_xmm_vals + 15 * 16, %xmm15
        fxsave64 cs_fx_before

        movabsq $CS_RBX, %rbx
        movabsq $CS_RCX, %rcx
        movabsq $CS_RSI, %rsi
        movabsq $CS_RDI, %rdi
        movabsq $CS_RBP, %rbp
        movabsq $CS_R8, %r8
        movabsq $CS_R9, %r9
        movabsq $CS_R10, %r10
        movabsq $CS_R11, %r11
        movabsq $CS_R12, %r12
        movabsq $CS_R13, %r13
        movabsq $CS_R14, %r14
        movabsq $CS_R15, %r15

        pushfq
        orq     $CS_RFLAGS_SET, (%rsp)
        popfq
        pushfq                          /* flags as they go into the park */
        popq    %rax
        movq    %rax, cs_flags_before

        movl    cs_park_us, %eax
        movl    $0x4F0, %edx
        outl    %eax, %dx               /* the one park: save/restore may happen here */

        pushfq
        popq    %rax
        movq    %rax, cs_flags_after
        cld

        movq    %rbx, cs_gpr_got + 0 * 8
        movq    %rcx, cs_gpr_got + 1 * 8
        movq    %rsi, cs_gpr_got + 2 * 8
        movq    %rdi, cs_gpr_got + 3 * 8
        movq    %rbp, cs_gpr_got + 4 * 8
        movq    %r8,  cs_gpr_got + 5 * 8
        movq    %r9,  cs_gpr_got + 6 * 8
        movq    %r10, cs_gpr_got + 7 * 8
        movq    %r11, cs_gpr_got + 8 * 8
        movq    %r12, cs_gpr_got + 9 * 8
        movq    %r13, cs_gpr_got + 10 * 8
        movq    %r14, cs_gpr_got + 11 * 8
        movq    %r15, cs_gpr_got + 12 * 8
        fxsave64 cs_fx_after

        movq    %fs:0, %rax
        movq    %rax, cs_seg_got + 0
        movq    %fs:8, %rax
        movq    %rax, cs_seg_got + 8
        movq    %gs:0, %rax
        movq    %rax, cs_seg_got + 16
        movq    %gs:8, %rax
        movq    %rax, cs_seg_got + 24

        smsw    %rax
        movq    %rax, cs_cr0_after

        cmpl    $0, cs_have_rdtscp
        je      1f
        rdtscp
        movl    %ecx, cs_aux_got
        jmp     2f
1:      rdtsc
2:      shlq    $32, %rdx
        orq     %rdx, %rax
        movq    %rax, cs_tsc_after

        fninit
        ldmxcsr cs_mxcsr_default
        popq    %r15
        popq    %r14
        popq    %r13
        popq    %r12
        popq    %rbp
        popq    %rbx
        ret

        .section .note.GNU-stack, "", @progbits

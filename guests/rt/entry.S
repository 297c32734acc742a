/*
 * vmferry guest runtime: multiboot entry, ring-0 set-up, drop to ring 3.
 *
 * Ring-0 code is kept to a few dozen instructions (ring 0 is very slow on
 * kvm_pvm): the page tables are built at assembly time (.data), so the only
 * run-time work is the PDPT entries for RAM above 4 GiB.
 *
 *   32-bit entry -> CR4 (PAE, OSFXSR, OSXMMEXCPT) -> CR3 -> EFER (LME, NXE)
 *   -> CR0 (PG, MP; EM/TS clear) -> lgdt -> ljmp to 64-bit
 *   -> vCPU 0 only: extend the identity map to the top of RAM (multiboot map)
 *   -> rt_ring0_hook (weak, per image) -> iretq to ring 3 (IOPL=3, IF=0)
 *   -> rt_main(vcpu) in ring 3.
 */
#include "rt_layout.h"

#define MB_MAGIC   0x1BADB002
#define MB_FLAGS   0x00000003          /* page-align modules + memory info */

#define KCODE64    0x08
#define KDATA      0x10
#define UDATA      0x1B                /* 0x18 | RPL 3 */
#define UCODE64    0x23                /* 0x20 | RPL 3 */

#define PTE_PUW    0x7                 /* present | writable | user */
#define PDE_2M     0x87                /* ... | page size */

        .section .multiboot, "a"
        .balign 4
        .long   MB_MAGIC
        .long   MB_FLAGS
        .long   -(MB_MAGIC + MB_FLAGS)

/* ------------------------------------------------------------------ */
        .section .text.entry, "ax"
        .code32
        .globl  _start
_start:
        cmpl    $0x2BADB002, %eax
        je      .Lbsp
        cmpl    $0x564D4650, %eax
        jne     .Ldead32
        cmpl    $RT_MAX_VCPUS, %esi
        jae     .Ldead32
        movl    %esi, %edi
        /* Secondary vCPU: wait (halting, not spinning) for vCPU 0's release. */
.Lwait:
        cmpl    $0, rt_release
        jne     .Lcommon
        movl    $100, %eax
        movw    $0x4F0, %dx
        outl    %eax, %dx
        jmp     .Lwait

.Lbsp:
        movl    %ebx, rt_mbi_addr
        xorl    %edi, %edi

.Lcommon:
        /* EFER value in %esi: LME, plus NXE when CPUID says NX exists. */
        movl    $0x100, %esi
        movl    $0x80000000, %eax
        cpuid
        cmpl    $0x80000001, %eax
        jb      1f
        movl    $0x80000001, %eax
        cpuid
        btl     $20, %edx
        jnc     1f
        orl     $0x800, %esi
1:
        movl    $0x620, %eax            /* PAE | OSFXSR | OSXMMEXCPT */
        movl    %eax, %cr4
        movl    $rt_pml4, %eax
        movl    %eax, %cr3
        movl    $0xC0000080, %ecx
        rdmsr
        orl     %esi, %eax
        wrmsr
        movl    %cr0, %eax
        andl    $~0x0C, %eax            /* clear EM, TS */
        orl     $0x80000003, %eax       /* PG | MP | PE */
        movl    %eax, %cr0
        lgdt    rt_gdt_desc
        ljmp    $KCODE64, $.Lstart64

.Ldead32:
        xorl    %eax, %eax
        movw    $0x4F0, %dx
        outl    %eax, %dx
        jmp     .Ldead32

/* ------------------------------------------------------------------ */
        .code64
.Lstart64:
        movl    $UDATA, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    $KDATA, %eax
        movl    %eax, %ss
        xorl    %eax, %eax
        movl    %eax, %fs
        movl    %eax, %gs

        movl    %edi, %edi              /* vCPU index, zero-extended */
        leaq    1(%rdi), %rax
        shlq    $RT_STACK_SHIFT, %rax
        addq    $rt_stacks, %rax
        movq    %rax, %rsp              /* this vCPU's stack top (16-aligned) */

        testl   %edi, %edi
        jnz     2f
        call    rt_map_high
        call    rt_cpuid_probe
2:
        pushq   %rdi
        call    rt_ring0_hook
        popq    %rdi

        movq    %rsp, %rax              /* stack top again */
        pushq   $UDATA                  /* SS */
        pushq   %rax                    /* RSP */
        pushq   $0x3002                 /* RFLAGS: IOPL=3, IF=0 */
        pushq   $UCODE64                /* CS */
        pushq   $.Lring3
        iretq

.Lring3:
        call    rt_main                 /* %rdi = vCPU index */
1:      xorl    %eax, %eax
        movw    $0x4F0, %dx
        outl    %eax, %dx
        jmp     1b

/*
 * vCPU 0, ring 0, 64-bit: the first 4 GiB are mapped statically; add the
 * PDPT entries (1 GiB each) up to the highest usable RAM address listed in
 * the multiboot memory map (or mem_upper), capped at RT_MAX_GIB.
 * Clobbers rax, rbx, rcx, rdx, rsi, r8.
 */
rt_map_high:
        movl    rt_mbi_addr, %ebx
        xorl    %r8d, %r8d              /* highest end address */
        movl    (%rbx), %eax            /* flags */
        btl     $6, %eax
        jnc     .Lno_mmap
        movl    48(%rbx), %esi          /* mmap_addr */
        movl    44(%rbx), %ecx          /* mmap_length */
        addq    %rsi, %rcx              /* end of map */
.Lmm_loop:
        cmpq    %rcx, %rsi
        jae     .Lmm_done
        cmpl    $1, 20(%rsi)            /* type 1 = usable RAM */
        jne     .Lmm_next
        movq    4(%rsi), %rax
        addq    12(%rsi), %rax
        cmpq    %r8, %rax
        cmova   %rax, %r8
.Lmm_next:
        movl    (%rsi), %eax
        leaq    4(%rsi,%rax), %rsi
        jmp     .Lmm_loop
.Lno_mmap:
        btl     $0, %eax
        jnc     .Lmm_done
        movl    8(%rbx), %r8d           /* mem_upper, KiB above 1 MiB */
        shlq    $10, %r8
        addq    $0x100000, %r8
.Lmm_done:
        addq    $((1 << 30) - 1), %r8
        shrq    $30, %r8                /* GiB to map */
        cmpq    $RT_MAX_GIB, %r8
        jbe     1f
        movl    $RT_MAX_GIB, %r8d
1:      movl    $4, %ecx
        movq    $(rt_pd + 4 * 4096 + PTE_PUW), %rax
2:      cmpq    %r8, %rcx
        jae     3f
        movq    %rax, rt_pdpt(,%rcx,8)
        addq    $4096, %rax
        incq    %rcx
        jmp     2b
3:      movq    %cr3, %rax
        movq    %rax, %cr3
        ret

/*
 * vCPU 0, ring 0: record the CPUID leaves the runtime needs. CPUID must be
 * executed here: on kvm_pvm (AMD host, no CPUID faulting) CPUID in ring 3
 * runs natively and returns the HOST's values, not the VMM's.
 * Layout: see struct rt_cpuid_info in rt.h.
 */
rt_cpuid_probe:
        pushq   %rbx
        movl    $1, %eax
        xorl    %ecx, %ecx
        cpuid
        movl    %eax, rt_cpuid + 0
        movl    %ebx, rt_cpuid + 4
        movl    %ecx, rt_cpuid + 8
        movl    %edx, rt_cpuid + 12
        movl    $0x40000000, %eax
        xorl    %ecx, %ecx
        cpuid
        movl    %eax, rt_cpuid + 16
        cmpl    $0x40000010, %eax
        jb      1f
        cmpl    $0x40010000, %eax
        jae     1f
        movl    $0x40000010, %eax
        xorl    %ecx, %ecx
        cpuid
        movl    %eax, rt_cpuid + 20
1:      movl    $0x80000000, %eax
        xorl    %ecx, %ecx
        cpuid
        movl    %eax, rt_cpuid + 24
        cmpl    $0x80000001, %eax
        jb      2f
        movl    $0x80000001, %eax
        xorl    %ecx, %ecx
        cpuid
        movl    %ecx, rt_cpuid + 28
        movl    %edx, rt_cpuid + 32
2:      popq    %rbx
        ret

        .weak   rt_ring0_hook
rt_ring0_hook:
        ret

/* ------------------------------------------------------------------ */
        .section .data
        .balign 8
rt_gdt:
        .quad   0
        .quad   0x00AF9A000000FFFF      /* 0x08 ring-0 code, 64-bit */
        .quad   0x00CF92000000FFFF      /* 0x10 ring-0 data */
        .quad   0x00CFF2000000FFFF      /* 0x18 ring-3 data */
        .quad   0x00AFFA000000FFFF      /* 0x20 ring-3 code, 64-bit */
rt_gdt_end:
        .balign 4
        .word   0
rt_gdt_desc:
        .word   rt_gdt_end - rt_gdt - 1
        .long   rt_gdt

        .globl  rt_release, rt_mbi_addr, rt_cpuid
        .balign 8
rt_cpuid:
        .fill   9, 4, 0
        .balign 8
rt_release:
        .quad   0
rt_mbi_addr:
        .quad   0

/*
 * Identity map, built by the assembler: PML4[0] -> PDPT; PDPT[0..3] -> the
 * first 4 GiB (the rest filled by rt_map_high); RT_MAX_GIB page directories
 * of 2 MiB pages. Every level has U/S set (ring 3 uses all of it).
 */
        .section .data.pagetables, "aw"
        .balign 4096
        .globl  rt_pml4, rt_pdpt, rt_pd
rt_pml4:
        .quad   rt_pdpt + PTE_PUW
        .fill   511, 8, 0
rt_pdpt:
        .quad   rt_pd + 0 * 4096 + PTE_PUW
        .quad   rt_pd + 1 * 4096 + PTE_PUW
        .quad   rt_pd + 2 * 4096 + PTE_PUW
        .quad   rt_pd + 3 * 4096 + PTE_PUW
        .fill   508, 8, 0
rt_pd:
        .set    pdi, 0
        .rept   512 * RT_MAX_GIB
        .quad   (pdi << 21) + PDE_2M
        .set    pdi, pdi + 1
        .endr

        .section .bss
        .balign 4096
        .globl  rt_stacks
rt_stacks:
        .skip   RT_STACK_SIZE * RT_MAX_VCPUS

        .section .note.GNU-stack, "", @progbits

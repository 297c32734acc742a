/* cpustate: distinctive values shared by cpustate.c and cpustate_asm.S. */
#ifndef CPUSTATE_H
#define CPUSTATE_H

/* left by the ring-0 set-up (checked by the VMM side through KVM, not in the guest) */
#define CS_PAT              0x0001050400070106  /* default 0x0007040600070406; entry 0 stays WB */
#define CS_KERNEL_GS_BASE   0xFFFF8000CAFE0000
#define CS_STAR             0x0023001000000000
#define CS_LSTAR            0xFFFFFFFF81C0FFE0
#define CS_CSTAR            0xFFFFFFFF81C0DE00
#define CS_SFMASK           0x0000000000047700
#define CS_TSC_AUX          0x5A5A

/* GPRs loaded in ring 3 before the park */
#define CS_RBX  0xB0B1B2B3B4B5B6B7
#define CS_RCX  0xC0C1C2C3C4C5C6C7
#define CS_RSI  0x5151525354555657
#define CS_RDI  0xD1D1D2D3D4D5D6D7
#define CS_RBP  0xBEB1B2B3B4B5B6B7
#define CS_R8   0x0808080808080808
#define CS_R9   0x0909090909090909
#define CS_R10  0x1010101010101010
#define CS_R11  0x1111111111111111
#define CS_R12  0x1212121212121212
#define CS_R13  0x1313131313131313
#define CS_R14  0x1414141414141414
#define CS_R15  0x1515151515151515

/* CF PF AF ZF SF DF OF */
#define CS_RFLAGS_SET 0xCD5

#endif

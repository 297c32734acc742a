/* Constants shared by the runtime's assembly and C parts. */
#ifndef RT_LAYOUT_H
#define RT_LAYOUT_H
#define RT_MAX_VCPUS    8
#define RT_STACK_SHIFT  16              /* 64 KiB per vCPU */
#define RT_STACK_SIZE   (1 << RT_STACK_SHIFT)
#define RT_MAX_GIB      64              /* identity map cap */
#endif

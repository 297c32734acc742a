/*
 * fault: prints one line, then executes an undefined instruction in ring 3.
 * The runtime installs no IDT, so the #UD escalates to a triple fault: the
 * image shows how the VMM reports a guest that dies (vCPU, RIP, exit reason).
 * Parameter: vcpu=N   which vCPU faults, default 0 (the others park).
 */
#include "rt.h"

void guest_main(int vcpu, int nvcpus)
{
	u64 who = cmd_get_u64("vcpu", 0, NULL);
	if ((u64)vcpu != who % (u64)nvcpus)
		park_forever();
	rt_puts("fault: vcpu ");
	rt_put_dec((u64)vcpu);
	rt_puts(" executes ud2\n");
	__asm__ volatile("ud2");
	debug_exit(1); /* not reached */
}

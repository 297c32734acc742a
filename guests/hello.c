/* Smoke test: every vCPU says hello (under a lock), vCPU 0 exits 0 after all did. */
#include "rt.h"

static volatile u64 done;

void guest_main(int vcpu, int nvcpus)
{
	console_lock();
	rt_puts("hello from vcpu ");
	rt_put_dec((u64)vcpu);
	rt_puts("\n");
	console_unlock();
	atomic_add(&done, 1);
	if (vcpu != 0)
		return;
	while (atomic_load(&done) < (u64)nvcpus)
		halt_us(100);
	rt_puts("hello: ");
	rt_put_dec((u64)nvcpus);
	rt_puts(" vcpus, tsc_khz=");
	rt_put_dec(tsc_khz());
	rt_puts(", cmdline=\"");
	rt_puts(cmdline());
	rt_puts("\"\n");
	for (int i = 0; i < ram_nregions; i++) {
		rt_puts("ram ");
		rt_put_hex(ram_regions[i].base, 16);
		rt_puts(" +");
		rt_put_hex(ram_regions[i].len, 16);
		rt_puts("\n");
	}
	debug_exit(0);
}

"""Building, running, pausing and saving a VM."""

from vmferry.machine.config import MachineConfig, parse_size
from vmferry.machine.machine import GuestExit, Machine, run_to_exit

__all__ = ["GuestExit", "Machine", "MachineConfig", "parse_size", "run_to_exit"]

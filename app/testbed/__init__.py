"""Emulated edge devices on this machine: the local asyncssh testbed and the network-namespace tier."""

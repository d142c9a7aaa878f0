"""Memory virtualization: the device slab, the pinned host pool, the swap engine between them, and the residency policy."""

"""Pure logic of the agent: codecs, index, allocator, grants, roles. No I/O, no clock."""

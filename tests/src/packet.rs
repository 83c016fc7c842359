//! Packet building and checking for BPF_PROG_TEST_RUN tables.

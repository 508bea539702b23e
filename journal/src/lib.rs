//! twinblock-journal: the NVRAM journal (persistence modes, record format, regions, scan).

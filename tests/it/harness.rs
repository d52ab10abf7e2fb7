//! Starting rip for a test, and talking HTTP to it.

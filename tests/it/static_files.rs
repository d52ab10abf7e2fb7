//! Static files with --root: served, and never a file outside the root.

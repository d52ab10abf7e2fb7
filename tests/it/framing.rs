//! Request framing: every ambiguous or malformed request is answered 400 and closed.

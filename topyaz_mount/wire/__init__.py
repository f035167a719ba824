"""What both sides speak: frames and messages, the RPC peer, byte numbering for
resume, keepalives, pacing and content hashes."""

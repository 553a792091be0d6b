"""The curator's work: triage, fixing masks, reviewing volunteers, browsing targets."""

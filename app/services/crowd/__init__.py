"""The crowd's part of the loop: which task a volunteer gets (picker), what their answer does
(answer), which cells are done (retirement), and what a target does next: refine, close its
windows, complete (settle)."""

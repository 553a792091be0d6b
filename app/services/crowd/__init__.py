"""The crowd's part of the loop: which task a volunteer gets (picker) and what their answer does
(answer)."""

"""Learning: the AiO model (code pyramid, Sec. 3.2), its losses and self-distillation (Eqs. 3-5), the
training loop (Sec. 4.2) and the run directory it writes."""

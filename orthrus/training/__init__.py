"""Drafter training (ORTHRUS.md section 3): self-distillation data (`distill`), packing and
anchors (`data`), the dual-pass training step and fault-tolerant runs (`trainer`), the CLI."""

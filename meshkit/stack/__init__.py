"""The process stack: Circus control, operator commands and flap control."""

"""dpokit."""

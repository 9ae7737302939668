"""Position-bias interventions: methods that change where tokens sit (RoPE positions) and which blocks see each other
(PINE)."""

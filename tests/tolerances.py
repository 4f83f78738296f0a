"""Every numerical tolerance of the test suite, in one place, with the reason for each."""

# Same math, different kernels (MLX vs PyTorch GEMMs, fused attention), float32, tiny random configs.
COMPONENT = {"rtol": 1e-4, "atol": 1e-4}
# Vision towers against a torch oracle: deep stacks of LayerNorm + attention in float32.
VISION = {"rtol": 1e-4, "atol": 1e-3}
# Decoder logits against a torch oracle (tiny config, float32).
LOGITS = {"rtol": 1e-4, "atol": 1e-3}
# Position-table interpolation against torch.nn.functional.interpolate and the golden tables.
INTERPOLATION_ATOL = 1e-5
# Cached vs uncached forward in the same backend: only the summation order differs.
CACHE = {"rtol": 1e-5, "atol": 1e-4}
# MoE routing against a torch oracle: expert sets are compared only where the k-th/(k+1)-th softmax score
# gap exceeds this (a near-tie may legitimately resolve either way under float32 rounding).
ROUTING_GAP = 1e-5

# Golden cases (../shared/golden/README.md, "Recommended tolerances"), float32.
GOLDEN_EMB_REL_L2 = 1e-4
GOLDEN_EMB_MAX_ABS = 1e-3
GOLDEN_HIDDEN_MAX_ABS = 1e-3
GOLDEN_LOGITS_MAX_ABS = 1e-2
GOLDEN_LOGITS_REL_L2 = 1e-4
GOLDEN_ROUTING_GAP = 1e-5  # expert sets must agree wherever the 6th/7th score gap exceeds this
# MLX vs PyTorch on the same float32 weights (different GEMMs and attention kernels).
BACKENDS = {"rtol": 1e-4, "atol": 2e-4}

"""Model sizes that are read without loading torch: the workflow sizes its jobs' resources from them
(``workflow/rules/common.smk``), and every Snakemake job parses the workflow again."""

#: Named sizes. ``paper`` is MinD-Vis's SC-MBM (embed 1024, depth 24, heads 16, decoder 512 x 8, mlp 1.0).
MBM_PRESETS = {
    "tiny": dict(embed_dim=128, depth=4, num_heads=4, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
                 mlp_ratio=1.0),
    "small": dict(embed_dim=256, depth=6, num_heads=8, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=8,
                  mlp_ratio=1.0),
    "base": dict(embed_dim=512, depth=12, num_heads=8, decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8,
                 mlp_ratio=1.0),
    "paper": dict(embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512, decoder_depth=8,
                  decoder_num_heads=16, mlp_ratio=1.0),
}

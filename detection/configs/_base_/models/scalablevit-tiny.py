# A small ScalableViT (every block type and all four stages, a fraction of S's width and depth): the backbone of
# the tiny configs and of the first runs, in detection and segmentation alike. `--data-set SHAPES` of
# classification/ pretrains it with the same sizes as --model-kwargs (README, "First run").
tiny_arch = dict(embed_dims=(32, 64, 96, 128), num_heads=(1, 2, 3, 4), depths=(2, 2, 2, 2),
                 sr_ratios=(8, 4, 2, 1), c_ratios=(1.25, 1.25, 1.25, 1))

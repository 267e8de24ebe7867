# mindvis: decode what a person saw from fMRI.
# This file is the table of contents; the rules live in workflow/rules/, one
# file per stage, and call the `mindvis` command line.

from snakemake.utils import min_version

min_version("8.0")


configfile: "configs/default.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/stimuli.smk"
include: "workflow/rules/simulate.smk"


rule decode:
    """Every stage built so far, for every subject of the config."""
    input:
        decode_targets(),
    default_target: True

# mindvis: decode what a person saw from fMRI.
# This file is the table of contents; the rules live in workflow/rules/, one
# file per stage, and call the `mindvis` command line.

from snakemake.utils import min_version

min_version("8.0")


# The embedded default, unless the command line names a config of its own
# (configs are standalone: they never inherit each other's values).
if not workflow.configfiles:

    configfile: "configs/default.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/stimuli.smk"
include: "workflow/rules/simulate.smk"
include: "workflow/rules/sources.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/pretrain_mbm.smk"
include: "workflow/rules/pretrain_ldm.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/generate.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule decode:
    """Every stage for every subject of the config, ending with each report.html and results/summary.{csv,html}."""
    input:
        decode_targets(),
    default_target: True

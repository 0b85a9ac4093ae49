from snakemake.utils import min_version, validate

from sftpipe.config import canonical, check_config, check_config_files
from sftpipe.entry import checked, prepare_job_environment

min_version("9.0")


# A --configfile given on the command line replaces the default instead of being merged into it,
# so that a demo or test config does not inherit the default's datasets.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


# Our own check names each offending key first and alone; Snakemake's then fills in the defaults.
checked(workflow, lambda: check_config_files(workflow.configfiles))
checked(workflow, lambda: check_config(config))
validate(config, "config/schema.yaml", set_default=True)
config.update(canonical(config))

prepare_job_environment(workflow.basedir, remote=workflow.remote_exec)


report: "report/workflow.rst"


include: "rules/common.smk"


wildcard_constraints:
    dataset=one_of(DATASETS),
    experiment=one_of(EXPERIMENTS),
    model=one_of(BASE_MODELS),
    renderer=one_of(RENDERERS),
    variant="base|tuned|exported|preference|rl",
    task=one_of(EVAL_TASKS),


include: "rules/model.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/export.smk"
include: "rules/eval.smk"
include: "rules/preference.smk"
include: "rules/rl.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        reports=expand(rules.report.output.markdown, experiment=EXPERIMENTS),
        summary=rules.summarize_experiments.output.summary,
        exports=expand(rules.export_gguf.output[0], experiment=EXPERIMENTS) if EXPORT.gguf else [],

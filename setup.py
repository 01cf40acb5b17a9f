"""megatron_llama: train LLaMA the way the paper did, as a thin plugin on megatron-core."""

import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# Started by Python at every interpreter start (site-packages' .pth files): lets the stock
# `lm_eval` command find the `lm_eval.models` entry point below, which lm-eval 0.4 does
# not look for itself. It imports one small module and nothing else until lm-eval runs.
PTH_NAME = "megatron_llama-lm_eval.pth"
PTH_LINE = "import megatron_llama_lm_eval_hook as m; m.install()\n"


class BuildPyWithPth(build_py):
    """build_py that also writes PTH_NAME at the root of the wheel (site-packages once
    installed): into build_lib for a wheel, into the editable wheel's tree for `pip -e`."""

    def run(self):
        super().run()
        root = self.build_lib
        if getattr(self, "editable_mode", False):  # build_lib is not packed in this mode
            root = self.get_finalized_command("install").install_lib
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, PTH_NAME), "w", encoding="utf-8") as f:
            f.write(PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):  # written straight into the wheel's tree
            return outputs
        return outputs + [os.path.join(self.build_lib, PTH_NAME)]


setup(
    name="megatron_llama",
    version="0.1.0",
    description="LLaMA pretraining on NVIDIA megatron-core (TP/SP/PP/DP), with a CPU adapter",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_llama", "megatron_llama.*"]),
    # the .pth file's import hook (PTH_NAME), outside the package so that Python's start
    # does not import megatron_llama itself
    py_modules=["megatron_llama_lm_eval_hook"],
    # `megatron-llama sbatch`: the batch script template and the presets' cluster settings
    package_data={"megatron_llama.launch": ["templates/slurm/*.sbatch", "templates/slurm/*.env"]},
    install_requires=[
        # Install torch first (see the README: the CPU wheel on CPU hosts, your CUDA build on
        # GPU hosts); a range keeps pip from replacing it with another build.
        "torch>=2.4",
        "megatron-core==0.16.1",
        "numpy",
        "sentencepiece",
        "pyyaml",
        "tqdm",
        "psutil",  # memory checks; megatron-core's dist_checkpointing imports it undeclared
        "safetensors",  # Hugging Face import/export
        "tokenizers",   # the tokenizer.json of a Hugging Face export; training tiktoken ranks
        "tiktoken",     # Llama 3's tokenizer.model is a tiktoken BPE rank file
        "jinja2",       # chat templates (Llama 2 [INST], Llama 3 headers), as Hugging Face renders them
        "protobuf",     # SentencePiece's model proto, read for the tokenizer.json of an HF export
    ],
    extras_require={
        # a command that needs a missing extra says so in one line (errors.require)
        "deepspeed": ["deepspeed==0.19.8"],  # --engine deepspeed; tested with this release
        "wandb": ["wandb"],                  # --wandb-project
        "plot": ["matplotlib"],              # megatron-llama plot, the benchmark sweep chart
        "hf": ["transformers>=4.47,<6"],     # --compare-hf; exports tested with 4.47.1 and 5.24
        # megatron-llama evaluate / lm-eval, the megatron_llama backend; tested with 0.4.13
        "eval": ["lm-eval==0.4.13"],
        "all": ["deepspeed==0.19.8", "wandb", "matplotlib", "transformers>=4.47,<6",
                "lm-eval==0.4.13"],
        # transformers 4.47.1: the last release with Hugging Face's own Meta->HF conversion
        # script, which the tests compare our export against.
        # lm-eval's datasets and hub kept at versions transformers 4.47.1 accepts (hub < 1)
        "test": ["pytest", "pytest-timeout", "transformers==4.47.1", "accelerate", "protobuf",
                 "deepspeed==0.19.8", "wandb", "matplotlib", "lm-eval==0.4.13", "datasets<5",
                 "huggingface-hub>=0.24,<1.0"],
    },
    cmdclass={"build_py": BuildPyWithPth},
    entry_points={"console_scripts": ["megatron-llama=megatron_llama.cli:main"],
                  # `lm_eval --model megatron_llama`: lm-eval registers the entry points of
                  # this group through megatron_llama_lm_eval_hook.py (PTH_NAME)
                  "lm_eval.models": ["megatron_llama=megatron_llama.evaluate.backend:MegatronLlamaLM"]},
    classifiers=["License :: OSI Approved :: Apache Software License",
                 "Programming Language :: Python :: 3"],
)

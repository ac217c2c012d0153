from setuptools import setup

setup(
    name="lecture-flash",
    version="0.1.0",
    description="A fast, drop-in causal attention for PyTorch and the 'Let's build GPT' lecture model on it",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # The folders keep the design's names; the installed names are unique (`kernels` is Hugging
    # Face's hub-kernels package, a transformers dependency since 5.25; `gpt` is what lecture
    # users call their own script).
    packages=["lecture_flash", "lecture_flash.gpt"],
    package_dir={"lecture_flash": "kernels", "lecture_flash.gpt": "gpt"},
    python_requires=">=3.9",
    install_requires=[
        # A range, not a pin: users with a CUDA build of torch keep it.
        "torch>=2.4",
        "numpy",
        "tqdm",
        # Triton ships wheels for Linux x86_64 only; elsewhere the pure-PyTorch backends serve.
        # The kernels need Triton >= 3.3 (torch >= 2.7); with an older one, which an older torch
        # pins, "auto" uses PyTorch's SDPA and backend="triton" says why it cannot run.
        "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    # Command lines that work from any folder, even one holding the lecture's own gpt.py (which
    # `python -m gpt.train` run from there would import instead of ours). They import their
    # module inside (gpt/cli.py), so that a Ctrl-C while torch loads ends in one line.
    entry_points={"console_scripts": ["lecture-flash-train = lecture_flash.gpt.cli:train",
                                      "lecture-flash-sample = lecture_flash.gpt.cli:sample"]},
    extras_require={
        # pytest-xdist: the suite runs on two processes (tests/conftest.py); transformers:
        # tests/test_hf.py builds tiny models to check lecture_flash.hf against.
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "transformers>=4.53"],
        "hf": ["transformers>=4.53"],
        "plot": ["matplotlib"],
    },
)

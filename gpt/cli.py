"""The command lines' entry points (setup.py's console scripts): lecture-flash-train and
lecture-flash-sample. They import their module (torch with it: seconds) inside, so that a
Ctrl-C during that start ends with one line, as it does once training or sampling runs."""
import importlib
import sys


def _run(module):
    try:
        return importlib.import_module(module).main()
    except KeyboardInterrupt:  # main() says more once it runs; this is before, or between
        sys.exit("interrupted while starting: nothing was written")


def train():
    return _run("lecture_flash.gpt.train")


def sample():
    return _run("lecture_flash.gpt.sample")

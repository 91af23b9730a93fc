"""The errors a user can fix: bad input (a config, flag, path, prompt or checkpoint), and a
broken install (a package the project needs cannot be imported).

The command lines (cla_jax.cli) print such an error as one line and exit 2; anything else is
an internal failure and keeps its traceback. It subclasses ValueError so that callers (and
tests) that catch ValueError keep working.
"""
import re


class UserError(ValueError):
    """Bad input; the message says what is wrong and how to fix it."""


class InstallError(UserError):
    """A package cannot be imported: the install is broken, not the user's input. The message
    names the package and the pip command that fixes it."""

    # Modules whose pip package has another name (TensorFlow only to read files: the CPU build).
    PIP_NAMES = {"tensorflow": "tensorflow-cpu", "yaml": "pyyaml"}

    def __init__(self, needed_by: str, error: ImportError):
        # Wrappers (tfds re-raises with its own message) may drop `name`: read it from the text.
        found = re.search(r"No module named '([^']+)'", str(error))
        module = (error.name or (found.group(1) if found else "")).split(".")[0]
        if not module:
            super().__init__(f"{needed_by} failed to import a package ({error}): a broken "
                             "install, not a problem with your input; reinstall cla-jax with "
                             "its dependencies (pip install -e .)")
            return
        super().__init__(
            f"{needed_by} failed to import {module!r}: a broken install, not a problem with "
            f"your input; pip install {self.PIP_NAMES.get(module, module)} (or reinstall "
            "cla-jax with its dependencies: pip install -e .)")

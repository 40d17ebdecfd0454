"""Errors that the CLI turns into a message on stderr and a documented exit code.

Exit codes: 0 ok, 1 failed checks, 2 usage/config error, 3 partial success.
"""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3


class RagtuneError(Exception):
    """An error with a message meant for the user (what, where, how to fix)."""

    exit_code = EXIT_FAILED


class UsageError(RagtuneError):
    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """Every problem found in a config, reported at once."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class PromptTooLong(UsageError):
    """A prompt (with its sources) that does not fit the model's context; the server answers it with
    OpenAI's code for it. `prompt_tokens` and `context` give the sizes where known (0 otherwise)."""

    api_code = "context_length_exceeded"

    def __init__(self, message: str, prompt_tokens: int = 0, context: int = 0):
        super().__init__(message)
        self.prompt_tokens, self.context = prompt_tokens, context


class ModelPathError(UsageError):
    """A model path that does not exist or is not a loadable model directory."""


class CheckFailed(RagtuneError):
    exit_code = EXIT_FAILED

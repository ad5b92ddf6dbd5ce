"""The one exception type users see: it names the input at fault and what to do about it."""


class MaceInputError(ValueError):
    def __init__(self, input_name: str, problem: str, fix: str = ""):
        self.input_name = input_name
        msg = f"MACE: input '{input_name}': {problem}"
        if fix:
            msg += f" {fix}"
        super().__init__(msg)


class MaceCancelled(RuntimeError):
    """Raised by a progress callback when the user cancels; nothing has been applied yet."""

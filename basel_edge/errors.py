"""The one exception type for mistakes a user can fix (bad path, wrong format, out-of-range option)."""


class UserError(Exception):
    """A problem with the user's input; the CLI prints it as one line and exits with status 2."""


def read_json(path, missing: str):
    """Parse a JSON file, turning a missing or malformed file into a UserError (`missing` says what to do)."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise UserError(missing)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc})") from None

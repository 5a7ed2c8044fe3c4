"""The one exception type a user of moec can meet.

Every error a user can cause (a missing file, a wrong config, an engine for another GPU, a graph a
pass cannot handle) is raised as ``MoecError`` with a message that names the thing (file, tensor,
node) and says what to do. The CLI turns it into one red line and a non-zero exit, never a
traceback. Bugs in moec itself stay ordinary exceptions so they do show a traceback.
"""


class MoecError(Exception):
    """A problem with the user's input or environment, explained in the message."""


# What json.loads(path.read_text()) raises for content no reader can take: not JSON or not UTF-8
# (JSONDecodeError, UnicodeDecodeError: both ValueErrors), or nested too deep for Python's parser
# (RecursionError, which no JSONDecodeError catches). Every reader of a user's JSON file catches
# this tuple, plus OSError where the read itself may fail.
BAD_JSON: tuple[type[BaseException], ...] = (ValueError, RecursionError)

"""Sub-commands of the ``agentstate`` CLI; each module has ``add_parser(verbs)``.

A module's ``add_parser`` adds its verb to the sub-parsers and sets ``handler`` (a function
``args -> exit code``) as the parser default.
"""

COMMAND_MODULES = [
    "agentstate.commands.run",
    "agentstate.commands.learners",
    "agentstate.commands.sweep",
    "agentstate.commands.results",
    "agentstate.commands.predict_atari",
    "agentstate.commands.train",
    "agentstate.commands.gradcheck",
    "agentstate.commands.bench",
]

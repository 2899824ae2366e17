"""The sim config: the JSON quantsim-config rule types, their parser, ``SimConfig`` with
``load_config``, and the bundled presets."""

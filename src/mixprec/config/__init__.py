"""The sim config: the JSON quantsim-config rules, their parser and the bundled presets."""

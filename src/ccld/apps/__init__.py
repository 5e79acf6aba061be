"""The front-ends: the `ccld` command, prompt files and the web app. Each builds `ccld.Settings`
and hands it to the pipeline."""

"""The app: the command line, the pipeline that runs the stages in order, dry-run, serve, sweep and repeats, and the
composed config. It imports the stages (`ragtune.data_prep`, `ragtune.train`, `ragtune.eval`), which import only
`ragtune.core`."""

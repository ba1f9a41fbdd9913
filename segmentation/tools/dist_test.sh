#!/usr/bin/env bash
# The published command's path (bash tools/dist_test.sh CONFIG CHECKPOINT GPUS [--aug-test] [--eval mIoU]): the same
# as ../dist_test.sh.
exec bash "$(cd "$(dirname "$0")" && pwd)/../dist_test.sh" "$@"

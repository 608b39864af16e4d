#!/usr/bin/env bash
# Issue 13's dil-types protocol study; what it runs and how to resume it: ../dil-study.sh
exec "$(dirname "$0")/../dil-study.sh" dil-types "$@"

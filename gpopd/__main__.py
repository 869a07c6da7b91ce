from gpopd.cli import main

raise SystemExit(main())

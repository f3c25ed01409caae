from discover.cli import main

raise SystemExit(main())

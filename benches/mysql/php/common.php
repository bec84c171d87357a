<?php
// What every measurement script shares: its arguments, a guarded step, and the one JSON line
// it prints for the bench (benches/mysql/php.rs) to read.
//
// Arguments: host port user password database count warmup. The warm-up runs first, untimed,
// so that a proxy's pool and the server's thread cache are as a running app finds them.

// A relay that lost track of a response would leave the client waiting forever; the bench
// kills a script that overruns, this makes a stuck read fail sooner.
ini_set('mysqlnd.net_read_timeout', '10');
mysqli_report(MYSQLI_REPORT_ERROR | MYSQLI_REPORT_STRICT);

/** The script's arguments, by name. */
function args(): array
{
    global $argv;
    if (count($argv) != 8) {
        fwrite(STDERR, "usage: {$argv[0]} host port user password database count warmup\n");
        exit(2);
    }
    return [
        'host' => $argv[1],
        'port' => (int) $argv[2],
        'user' => $argv[3],
        'password' => $argv[4],
        'db' => $argv[5],
        'count' => (int) $argv[6],
        'warmup' => (int) $argv[7],
    ];
}

/** A new connection as an app opens one (TCP, never the server's unix socket). */
function open(array $a): mysqli
{
    return new mysqli($a['host'], $a['user'], $a['password'], $a['db'], $a['port']);
}

/**
 * Runs `$step` `warmup` times, then `count` times timed; prints the count, the seconds, the
 * errors and the first error's message as one JSON line. A step that throws or returns false
 * is an error; the run goes on.
 */
function measure(array $a, callable $step): void
{
    $errors = 0;
    $first = null;
    $one = function () use ($step, &$errors, &$first) {
        try {
            if ($step() === false) {
                $errors++;
                $first ??= 'wrong result';
            }
        } catch (Throwable $e) {
            $errors++;
            $first ??= $e->getMessage();
        }
    };
    for ($i = 0; $i < $a['warmup']; $i++) {
        $one();
    }
    $start = hrtime(true);
    for ($i = 0; $i < $a['count']; $i++) {
        $one();
    }
    $secs = (hrtime(true) - $start) / 1e9;
    echo json_encode([
        'count' => $a['count'],
        'warmup' => $a['warmup'],
        'secs' => $secs,
        'errors' => $errors,
        'first_error' => $first,
    ]), "\n";
}
